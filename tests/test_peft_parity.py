"""Our files are PEFT's: PEFT loads ours and we load theirs, with equal losses."""

from __future__ import annotations

import pytest
import torch

from softprompt.adapters import load_adapter
from softprompt.insight.evaluate import evaluate
from softprompt.models import load_base_model
from softprompt.rows import training_rows
from softprompt.tuning.save import save_trained
from softprompt.tuning.train import TrainConfig, train

peft = pytest.importorskip("peft")

TEXTS = [
    "be kind every day",
    "the mountain and the river",
    "hope is a light",
    "i want you to act as a motivational coach",
]


def peft_loss(peft_model, spm, texts: list[str]) -> float:
    """Mean loss through PEFT's forward on the same tokens softprompt scores."""
    total, count = 0.0, 0
    for ids, _, _ in training_rows(spm, texts, None, 128)[0]:
        labels = torch.tensor([ids])
        labels[0, 0] = -100  # the first text token is not scored (see evaluate.py)
        with torch.no_grad():
            out = peft_model(input_ids=torch.tensor([ids]), labels=labels)
        n = len(ids) - 1
        total += float(out.loss) * n
        count += n
    return total / count


def test_peft_loads_our_adapter_with_the_same_loss(spm, tiny_model_dir, tmp_path):
    from softprompt.tuning.init import init_prompt

    config = TrainConfig(virtual_tokens=4, epochs=2, lr=0.1, batch_size=2)
    result = train(spm, "ours", init_prompt(spm.base, 4), TEXTS, TEXTS[:2], config, progress=False)
    folder = save_trained(spm, "ours", tmp_path / "ours", config, result)
    ours = evaluate(spm, TEXTS, "ours").loss

    base = load_base_model(str(tiny_model_dir)).model
    peft_model = peft.PeftModel.from_pretrained(base, str(folder))
    assert peft_loss(peft_model, spm, TEXTS) == pytest.approx(ours, rel=1e-5)


@pytest.mark.parametrize("kind", ["prompt_tuning", "p_tuning"])
def test_we_load_peft_adapters_with_the_same_loss(spm, tiny_model_dir, tmp_path, kind):
    base = load_base_model(str(tiny_model_dir)).model
    if kind == "prompt_tuning":
        config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)
    else:
        config = peft.PromptEncoderConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=5, encoder_hidden_size=8
        )
    torch.manual_seed(0)
    peft_model = peft.get_peft_model(base, config)
    peft_model.eval()
    peft_model.save_pretrained(str(tmp_path / kind))
    reference = peft_loss(peft_model, spm, TEXTS)

    spm.add_adapter(load_adapter(tmp_path / kind))
    assert evaluate(spm, TEXTS, kind).loss == pytest.approx(reference, rel=1e-5)
