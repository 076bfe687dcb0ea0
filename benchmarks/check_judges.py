"""Score one saved routing adapter through both of bench_tasks' judges.

bench_tasks scores softprompt's prompts with the library (``choice_accuracy``, batched) and
PEFT's models one row at a time through PEFT's forward (``Judge.score_peft``). This loads the
same adapter folder both ways (softprompt's ``load_adapter``; PEFT's
``PeftModel.from_pretrained``) and prints both accuracies: they must agree, or the benchmark's
two columns are not measured alike.

Run: .venv/bin/python benchmarks/check_judges.py ADAPTER_FOLDER   (a few minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tasks import Judge  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter", help="a prompt adapter folder trained on examples:routing")
    args = parser.parse_args()
    import transformers
    from peft import PeftModel

    from softprompt.adapters import load_adapter
    from softprompt.models import embedded_model_dir, load_base_model
    from softprompt.prompt import SoftPromptModel

    transformers.utils.logging.set_verbosity_error()
    judge = Judge("routing")
    spm = SoftPromptModel(load_base_model())
    adapter = load_adapter(args.adapter)
    spm.add_adapter(adapter)
    print("softprompt's judge:", judge.score_softprompt(spm, judge.rows, adapter.name))
    folder = embedded_model_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, args.adapter)
    print("PEFT's judge:", judge.score_peft(peft_model, tokenizer))


if __name__ == "__main__":
    main()
