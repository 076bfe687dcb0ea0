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


def peft_loss_by_hand(peft_model, spm, texts: list[str], virtual: int) -> float:
    """``peft_loss`` from PEFT's logits (for a method whose forward with labels computes its own
    training loss, as CPT's does): the same tokens, the same mean."""
    total, count = 0.0, 0
    for ids, _, _ in training_rows(spm, texts, None, 128)[0]:
        with torch.no_grad():
            logits = peft_model(input_ids=torch.tensor([ids]), labels=None).logits[0, virtual:]
        losses = torch.nn.functional.cross_entropy(
            logits[:-1], torch.tensor(ids[1:]), reduction="none"
        )
        total += float(losses.sum())  # every text token but the first (evaluate.py)
        count += len(ids) - 1
    return total / count


def test_we_load_peft_cpt_adapters_as_the_rows_they_prepend(spm, tiny_model_dir, tmp_path):
    # CPT trains deltas on the embeddings of in-context examples' tokens with its own loss; what
    # it saves, and prepends at inference, is the sum: fixed rows, a prompt like any other.
    base = load_base_model(str(tiny_model_dir)).model
    config = peft.CPTConfig(
        task_type="CAUSAL_LM",
        cpt_token_ids=[5, 6, 7, 8, 9],
        cpt_mask=[1] * 5,
        cpt_tokens_type_mask=[1, 2, 2, 3, 3],
    )
    torch.manual_seed(0)
    peft_model = peft.get_peft_model(base, config)
    with torch.no_grad():  # trained-looking deltas, not the zeros it starts from
        peft_model.prompt_encoder["default"].delta_embedding.weight.normal_(0, 0.2)
    peft_model.eval()
    peft_model.save_pretrained(str(tmp_path / "cpt"))
    reference = peft_loss_by_hand(peft_model, spm, TEXTS, 5)

    adapter = load_adapter(tmp_path / "cpt")
    assert adapter.method == "prompt" and adapter.num_virtual_tokens == 5
    spm.add_adapter(adapter)
    assert evaluate(spm, TEXTS, "cpt").loss == pytest.approx(reference, rel=1e-5)
    plain = base.get_input_embeddings().weight[[5, 6, 7, 8, 9]]
    assert not torch.allclose(adapter.weights, plain)  # the deltas are in the rows


def test_peft_prompt_methods_that_cannot_run_here_are_refused_saying_why(tmp_path):
    import json

    from softprompt.adapters import CONFIG_FILE
    from softprompt.errors import UserError

    for peft_type, why in (
        ("MULTITASK_PROMPT_TUNING", "task id"),
        ("ADAPTION_PROMPT", "inside the model"),
        ("LORA", "prompt-learning"),
    ):
        folder = tmp_path / peft_type
        folder.mkdir()
        (folder / CONFIG_FILE).write_text(json.dumps({"peft_type": peft_type}))
        with pytest.raises(UserError, match=why) as caught:
            load_adapter(folder)
        assert "\n" not in str(caught.value)
