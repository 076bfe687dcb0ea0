"""What a prompt changed: held-out loss and task accuracy (``evaluate``, ``scoring``), side by
side generations (``compare``), what the virtual tokens are near (``inspection``), and the HTML
report with its plots (``report``, ``plots``)."""
