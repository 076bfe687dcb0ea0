"""The ``softprompt`` command line: one function per command adds its arguments (the flags
several commands share are in ``args.py``).

``docs/cli.md`` is written from this parser at build time.
"""

from __future__ import annotations

import argparse
import os

from . import args
from . import evaluation as eval_cmds
from . import generation as gen_cmds
from . import sharing as share_cmds
from . import train as train_cmds

Commands = argparse._SubParsersAction  # what add_subparsers returns

EPILOG = """examples:
  softprompt demo
  softprompt train --data examples:role-prompts --output adapters/roles
  softprompt train --task roles=examples:role-prompts --task quotes=examples:quotes --output ads
  softprompt generate --adapter adapters/roles --prompt "I want you to act as a chef."
  softprompt eval --data examples:role-prompts:heldout --adapter adapters/roles
  softprompt compare --adapter adapters/roles --prompt "I want you to act as a chef." --markdown
  softprompt inspect adapters/roles
  softprompt report --adapter adapters/roles --output report.html
  softprompt serve --adapters adapters --port 8000
  softprompt embeds --adapter adapters/roles --prompt "I want you to act as a chef." --output x.pt
  softprompt push adapters/roles me/roles-prompt --dry-run
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="softprompt",
        description="Prompt tuning for causal language models: train soft prompts on a frozen "
        "base model, keep them as PEFT files, compare, evaluate and generate with many at once.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    add_demo(sub)
    add_train(sub)
    add_generate(sub)
    add_eval(sub)
    add_compare(sub)
    add_inspect(sub)
    add_report(sub)
    add_serve(sub)
    add_embeds(sub)
    add_push(sub)
    return parser


def add_demo(sub: Commands) -> None:
    demo = sub.add_parser(
        "demo",
        help="reproduce the PEFT prompt-tuning guide offline, end to end",
        description="Train two soft prompts (role-play prompts, quotes) from one "
        "base model, save them, load both and compare base vs tuned outputs.",
    )
    demo.add_argument(
        "--output",
        default="softprompt-demo",
        help="folder for the two adapters, report.html and summary.json (default: "
        "%(default)s); an earlier demo's output there is replaced, anything else is refused",
    )
    demo.add_argument(
        "--overwrite",
        action="store_true",
        help="replace role-prompts/, quotes/, report.html and summary.json in --output even "
        "when an earlier demo did not write them",
    )
    args.model_arg(demo)
    demo.set_defaults(func=train_cmds.cmd_demo)


def add_train(sub: Commands) -> None:
    train = sub.add_parser(
        "train",
        help="train a soft prompt (or several at once) on a dataset",
        description="Train a soft prompt and save it as a PEFT adapter folder. With --task "
        "(repeatable), train one prompt per task in one run over one loaded model, rows of all "
        "tasks sharing batches, each saved as --output/NAME with its own held-out loss.",
    )
    train.add_argument(
        "--data",
        help="examples:NAME, a .jsonl/.json/.csv/.parquet/.txt file, a dataset "
        "folder or a Hub dataset id",
    )
    train.add_argument(
        "--task",
        action="append",
        default=[],
        metavar="NAME=DATA[:FIELD]",
        help="instead of --data: a prompt named NAME trained on DATA (its FIELD, else "
        "--text-field or the default), saved in --output/NAME (repeatable)",
    )
    train.add_argument(
        "--output",
        required=True,
        help="adapter folder to write (with --task: the folder that gets one per task)",
    )
    args.model_arg(train)
    args.data_args(train)
    train.add_argument(
        "--eval-data",
        help="held-out data (default: the bundled held-out part "
        "for examples:, else --heldout-fraction of --data)",
    )
    train.add_argument(
        "--heldout-fraction",
        type=float,
        default=0.1,
        help="share of --data held out, to evaluate on and to choose the rows kept, when there "
        "is no --eval-data or bundled held-out part (default: %(default)s)",
    )
    train.add_argument("--virtual-tokens", type=int, default=8, help="default: %(default)s")
    train.add_argument(
        "--method",
        choices=["prompt", "prefix"],
        help="prompt: prompt tuning, rows of input embeddings (the guide's; served on vLLM by "
        "serve --upstream); prefix: prefix tuning, keys and values at every layer, started from "
        "the model's own (--init as for prompt; --init-from a prompt adapter deepens it) "
        "(default: prefix for prompt/completion and chat data, chosen on the task suite's mean "
        "and worst seed, see docs/benchmarks/tasks.md; prompt for plain text, and with "
        "--reparam residual; --init-from's own method)",
    )
    train.add_argument(
        "--init",
        choices=["vocab", "text", "labels", "random", "file"],
        help="vocab: random vocabulary rows; text: rows of --init-text; labels: one row per "
        "distinct completion of prompt/completion data, the mean of its tokens' rows (Lester et "
        "al. 2021's class-label init), the rest vocab; random: Gaussian scaled to the "
        "vocabulary's norm; file: --init-from (default: file with --init-from, else vocab)",
    )
    train.add_argument("--init-text", help="text whose token rows start the prompt (--init text)")
    train.add_argument(
        "--init-from",
        metavar="ADAPTER",
        help="adapter folder to continue from (implies --init file)",
    )
    train.add_argument(
        "--epochs",
        type=int,
        help="passes over the training data (default: 5; on prompt/completion and chat data, "
        "enough for at least 200 steps where a set is small, printed at the start)",
    )
    train.add_argument(
        "--max-epochs", type=int, metavar="N",
        help="past --epochs, train on while the held-out loss improves, up to N epochs in all "
        "(default on task data without --epochs: twice the epochs decided; else --epochs)",
    )  # fmt: skip
    train.add_argument(
        "--lr", type=float, help="learning rate (default: 0.03; 0.01 for a prefix on plain text)"
    )
    train.add_argument(
        "--weight-decay",
        type=float,
        help="AdamW's decoupled weight decay on the prompt's rows (default: 0.01 for prompt "
        "tuning on prompt/completion or chat data, where it was measured to help; else 0)",
    )
    train.add_argument("--batch-size", type=int, default=8, help="default: %(default)s")
    train.add_argument(
        "--max-length",
        type=int,
        help="text tokens per example, EOS included; longer texts are cut (default: what the "
        "longest training text needs, up to 256)",
    )
    train.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    train.add_argument(
        "--warmup", type=int, default=0, help="steps of linear learning-rate warm-up (default: 0)"
    )
    train.add_argument(
        "--schedule",
        choices=["constant", "linear", "cosine"],
        default="constant",
        help="learning rate after the warm-up; linear and cosine end at 0 (default: %(default)s)",
    )
    train.add_argument(
        "--group-by-length",
        action=argparse.BooleanOptionalAction,
        help="batch examples of similar length together, so less padding is computed; "
        "--no-group-by-length: plain shuffled batches (default: shuffled for prompt tuning on "
        "prompt/completion or chat data, where it was measured with --weight-decay 0.01; "
        "else grouped)",
    )
    train.add_argument(
        "--eval-every",
        type=int,
        default=0,
        metavar="N",
        help="held-out evaluation every N steps (default: at each epoch's end); the adapter "
        "saved is the evaluation --keep chooses",
    )
    train.add_argument(
        "--search",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="choose the method and learning rate on the run's own data before training: short "
        "trials of a few candidates (those of prefix and prompt tuning that --method, --reparam "
        "and --lr leave open) scored on training rows held out of the trials by the task's own "
        "metric, the better half going on each round, then the winner trained on all rows; "
        "about twice a run's time; prompt/completion and chat data of at least 20 rows, in one "
        "process (default: off: on generated tasks it never beat the defaults, see "
        "docs/benchmarks/tasks.md)",
    )
    train.add_argument(
        "--keep",
        choices=["best", "last", "metric"],
        default="best",
        help="the rows saved: best, those of the best held-out loss; last, the run's end; "
        "metric, those of the best held-out task metric (accuracy among the labels when the "
        "completions are a few repeated labels, else exact match of the reply's first line "
        "when every answer is short; ties go to the lower loss; held-out loss for chat, "
        "plain text and long answers) (default: %(default)s)",
    )
    train.add_argument(
        "--patience",
        type=int,
        default=0,
        metavar="N",
        help="stop after N evaluations without a better held-out loss (default: 0, never)",
    )
    train.add_argument(
        "--checkpoint-every",
        type=int,
        default=100,
        metavar="N",
        help="steps between checkpoints, also written at each epoch's end (default: %(default)s)",
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run writing --output (same settings and data) from its "
        "last checkpoint",
    )
    train.add_argument(
        "--compile",
        action="store_true",
        help="run the model through torch.compile: about a minute to start, then faster "
        "steps on a GPU (for long runs; see the README's GPU figures)",
    )
    train.add_argument(
        "--reparam",
        choices=("none", "residual"),
        help="residual: train prompt rows through a small residual MLP (residual prompt "
        "tuning, Razdaibiedina et al. 2023), saved as plain rows; prompt tuning only "
        "(default: residual for prompt tuning on prompt/completion or chat data, where the "
        "task suite measured it above plain rows; else none)",
    )
    train.add_argument(
        "--shard",
        action="store_true",
        help="under torchrun or accelerate launch: split the frozen base model's decoder layers "
        "across the processes (FSDP), each holding about 1/N of their weights, for a model too "
        "large for one device; data parallel as without it",
    )
    train.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    train.add_argument(
        "--allow-pickle",
        action="store_true",
        help="let --init-from read a pickle adapter_model.bin",
    )
    train.add_argument("--json", action="store_true", help="print a JSON summary")
    train.set_defaults(func=train_cmds.cmd_train)


def add_generate(sub: Commands) -> None:
    gen = sub.add_parser(
        "generate",
        help="complete prompts with the base model and adapters",
        description="Each --prompt runs with each --adapter (the base model if "
        "none); --requests gives one adapter per prompt. Rows with different "
        "adapters share batches.",
    )
    args.model_arg(gen)
    args.adapter_args(gen)
    gen.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    gen.add_argument(
        "--chat",
        action="store_true",
        help="send each --prompt as a user message in the model's chat template (after the "
        "adapter's virtual tokens), as the server's chat endpoint does and as prompts trained "
        "on conversations were trained",
    )
    gen.add_argument(
        "--requests",
        metavar="FILE.jsonl",
        help='one {"prompt": ..., "adapter": <adapter folder name> or null, "seed": <int, '
        "optional>} per line",
    )
    gen.add_argument(
        "--with-base",
        action="store_true",
        help="with --prompt, also run each prompt on the base model",
    )
    args.generation_args(gen)
    gen.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="requests decoded together at most (default: %(default)s)",
    )
    gen.add_argument("--json", action="store_true", help="one JSON object per request")
    gen.set_defaults(func=gen_cmds.cmd_generate)


def add_eval(sub: Commands) -> None:
    ev = sub.add_parser(
        "eval",
        help="loss, perplexity and task accuracy of the base model and adapters",
        description="Mean per-token loss of the base model and each adapter on "
        "each dataset, texts tokenised as in training; on prompt/completion and chat data also "
        "rank-classification accuracy (--metric choice), exact match (--metric exact) and how "
        "often a reply contains a pattern (--metric pattern), with zero- and few-shot baselines "
        "of the base model (--instruction, --few-shot). A chat row is judged on its last "
        "assistant turn: the conversation before it is the prompt, in the chat template.",
    )
    ev.add_argument("--data", action="append", required=True, help="dataset (repeatable)")
    args.adapter_args(ev)
    args.model_arg(ev)
    args.data_args(ev)
    ev.add_argument("--batch-size", type=int, default=16, help="default: %(default)s")
    ev.add_argument(
        "--max-length",
        type=int,
        help="text tokens per example, EOS included (default: what the longest text needs, up "
        "to 256)",
    )
    args.task_args(ev, ("loss", "choice", "exact", "pattern"))
    ev.add_argument(
        "--max-new-tokens",
        type=int,
        default=32,
        help="new tokens at most for --metric exact and pattern (default: %(default)s)",
    )
    ev.add_argument(
        "--ensemble",
        action="store_true",
        help="with --metric choice and several --adapter: also score them as one prompt "
        "ensemble (each candidate by its log-likelihood summed over the prompts; Lester et "
        "al. 2021)",
    )
    ev.add_argument("--json", action="store_true", help="print one JSON list of records")
    ev.set_defaults(func=eval_cmds.cmd_eval)


def add_compare(sub: Commands) -> None:
    cmp = sub.add_parser(
        "compare",
        help="base model vs adapters, side by side on the same prompts",
        description="For each prompt, the base model's completion and each adapter's, all "
        "rows of one prompt in one mixed batch.",
    )
    cmp.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    args.adapter_args(cmp)
    args.model_arg(cmp)
    args.generation_args(cmp)
    style = cmp.add_mutually_exclusive_group()
    style.add_argument("--json", action="store_true", help="print JSON")
    style.add_argument("--markdown", action="store_true", help="print Markdown tables")
    cmp.set_defaults(func=gen_cmds.cmd_compare)


def add_inspect(sub: Commands) -> None:
    ins = sub.add_parser(
        "inspect",
        help="nearest vocabulary tokens and norms of an adapter's virtual tokens",
        description="Per virtual token: the nearest vocabulary tokens by cosine similarity "
        "(Lester et al. 2021, section 7) and its norm against the vocabulary's norms.",
    )
    ins.add_argument("adapter", metavar="ADAPTER", help="adapter folder")
    args.model_arg(ins)
    ins.add_argument("--top-k", type=int, default=5, help="default: %(default)s")
    ins.add_argument("--allow-pickle", action="store_true", help="accept adapter_model.bin")
    ins.add_argument("--json", action="store_true", help="print JSON")
    ins.set_defaults(func=eval_cmds.cmd_inspect)


def add_report(sub: Commands) -> None:
    rep = sub.add_parser(
        "report",
        help="one self-contained HTML page of what tuning did",
        description="Config, loss curves, the eval matrix (table and heatmap), before/after "
        "generations, the inspect view and the base model's checksums, in one HTML file. With "
        "--metric, a task section too: the base model zero-shot (and with --instruction, "
        "--few-shot) beside each adapter, and each confusion matrix as a heatmap.",
    )
    args.adapter_args(rep, required=True)
    rep.add_argument(
        "--data",
        action="append",
        default=[],
        help="dataset (repeatable; default: each adapter's held-out data)",
    )
    rep.add_argument(
        "--prompt",
        action="append",
        default=[],
        help="prompt (repeatable; default: the guide's two prompts)",
    )
    rep.add_argument("--output", required=True, help="HTML file to write")
    rep.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --output even if it is not an earlier softprompt report",
    )
    args.model_arg(rep)
    args.data_args(rep)
    args.generation_args(rep, max_new_tokens=40, repetition_penalty=1.5)
    args.task_args(rep, ("choice", "exact", "pattern"))
    rep.add_argument(
        "--max-length",
        type=int,
        help="text tokens per example, EOS included (default: what the longest text needs, up "
        "to 256)",
    )
    rep.set_defaults(func=eval_cmds.cmd_report)


def add_serve(sub: Commands) -> None:
    srv = sub.add_parser(
        "serve",
        help="an OpenAI-compatible server for the base model and every adapter in a folder",
        description="Serve /v1/completions, /v1/chat/completions and /v1/models, with a "
        "playground page at /. Each subfolder of --adapters holding an adapter is a model "
        "named after the folder; the base model is served under its own name. Folders added "
        "or removed later are picked up without a restart.",
    )
    args.model_arg(srv)
    srv.add_argument(
        "--adapters",
        metavar="DIR",
        help="folder of adapter folders, each served as a model named after it (watched: "
        "folders added later are served without a restart)",
    )
    srv.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=REF",
        help="also serve REF (an adapter folder, or a Hub repository owner/name[@revision]) as "
        "model NAME (repeatable)",
    )
    srv.add_argument("--host", default="127.0.0.1", help="default: %(default)s")
    srv.add_argument("--port", type=int, default=8000, help="default: %(default)s")
    srv.add_argument(
        "--api-key",
        default=os.environ.get("SOFTPROMPT_API_KEY"),
        help="require Authorization: Bearer KEY on /v1 (default: $SOFTPROMPT_API_KEY, or none). "
        "A key given here shows in the process list: set SOFTPROMPT_API_KEY instead. With no key "
        "on a loopback address, only requests naming a loopback Host are answered",
    )
    srv.add_argument(
        "--max-batch-size",
        type=int,
        default=32,
        help="requests decoded together at most (default: %(default)s)",
    )
    args.engine_limit_args(srv)
    srv.add_argument(
        "--max-tokens-cap",
        type=int,
        default=4096,
        help="requests asking for more new tokens are refused (default: %(default)s)",
    )
    srv.add_argument(
        "--poll-seconds",
        type=float,
        default=1.0,
        help="how often the adapters folder is scanned; 0: only when asked (default: %(default)s)",
    )
    srv.add_argument(
        "--max-body-bytes",
        type=int,
        default=1 << 20,
        help="larger request bodies are refused (default: %(default)s)",
    )
    srv.add_argument(
        "--max-queue",
        type=int,
        help="requests waiting for a place in the batch at most (with --upstream: in flight); "
        "beyond it, 429 with Retry-After, and one request (prompts x n) may not ask for more "
        "(default: 4 x --max-batch-size; with --upstream, 256 per upstream)",
    )
    srv.add_argument(
        "--max-messages",
        type=int,
        default=128,
        help="chat messages per request at most, refused before any template work (the layout "
        "a conversation was trained in renders the template once per assistant turn) "
        "(default: %(default)s)",
    )
    srv.add_argument(
        "--public-metrics",
        action="store_true",
        help="with an API key, answer /metrics without it (for a Prometheus scraper that "
        "cannot send one); /docs and /openapi.json still need it",
    )
    srv.add_argument(
        "--retune",
        action="store_true",
        help="on the CPU, measure the decode paths again even if this machine has a decision "
        "cached (one made while the machine was busy), and cache the new one",
    )
    srv.add_argument(
        "--drain-seconds",
        type=float,
        default=30.0,
        help="on SIGTERM or Ctrl-C, how long running requests may finish (new ones get 503); "
        'the rest end with finish_reason "abort" (default: %(default)s)',
    )
    up = srv.add_argument_group(
        "generation on vLLM servers",
        "With --upstream, only the model's tokenizer, config and input embeddings are loaded "
        "here; each request goes to a vLLM server started with --enable-prompt-embeds on the "
        "same model: an adapter's as prompt_embeds (its rows, then the prompt's embeddings), the "
        "base model's as token ids. For an adapter, prefix (deep) adapters, echo with logprobs "
        "and repetition_penalty are refused with a 400 saying why (the local engine serves "
        "them). Credentials in an --upstream address are used, never shown. See "
        "docs/scale-out.md.",
    )
    up.add_argument(
        "--upstream",
        action="append",
        default=[],
        metavar="URL",
        help="a vLLM server (http://HOST:PORT) serving the same model (repeatable: requests go "
        "to the healthy one with the fewest in flight)",
    )
    up.add_argument(
        "--upstream-timeout",
        type=float,
        default=120.0,
        help="seconds without a byte from an upstream before its request ends with an error "
        "(default: %(default)s)",
    )
    up.add_argument(
        "--embeds-dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="dtype prompt_embeds are sent in: float32 is exact; bfloat16 halves the bytes for "
        "a model served in bfloat16 (default: %(default)s)",
    )
    up.add_argument(
        "--upstream-api-key",
        default=os.environ.get("SOFTPROMPT_UPSTREAM_API_KEY"),
        help="sent to the upstreams as Authorization: Bearer (vLLM's --api-key; default: "
        "$SOFTPROMPT_UPSTREAM_API_KEY, or none)",
    )
    srv.set_defaults(func=share_cmds.cmd_serve)


def add_embeds(sub: Commands) -> None:
    emb = sub.add_parser(
        "embeds",
        help="the prompt_embeds tensor that serves an adapter on vLLM",
        description="Write the tensor a prompt-embeds server (vLLM) takes for one request: the "
        "adapter's virtual token rows, then the prompt's token embeddings, (n + T, hidden).",
    )
    emb.add_argument("--adapter", metavar="DIR", help="adapter folder (default: none)")
    emb.add_argument("--prompt", required=True, help="prompt text")
    emb.add_argument("--output", help="write the tensor here with torch.save (a .pt file)")
    emb.add_argument(
        "--base64",
        action="store_true",
        help="print it base64-encoded, as vLLM's OpenAI server takes prompt_embeds",
    )
    emb.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    emb.add_argument("--allow-pickle", action="store_true", help="accept adapter_model.bin")
    args.model_arg(emb)
    emb.set_defaults(func=gen_cmds.cmd_embeds)


def add_push(sub: Commands) -> None:
    push = sub.add_parser(
        "push",
        help="upload an adapter folder to the Hugging Face Hub",
        description="Upload an adapter folder's files (PEFT config and weights, its model card "
        "README.md with the Hub's metadata, training config, loss log and plot) to a model "
        "repository, created if missing. The held-out data file is not uploaded. The token "
        "comes from the usual places (HF_TOKEN, `hf auth login`).",
    )
    push.add_argument("adapter", metavar="ADAPTER", help="adapter folder")
    push.add_argument("repo_id", metavar="REPO_ID", help="owner/name on the Hub")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--revision", help="branch to upload to (default: main)")
    push.add_argument("--commit-message", help="default: 'Upload ADAPTER with softprompt'")
    push.add_argument(
        "--dry-run",
        action="store_true",
        help="show exactly the files and the card's metadata that would be uploaded; upload "
        "nothing",
    )
    push.add_argument("--allow-pickle", action="store_true", help="accept adapter_model.bin")
    push.set_defaults(func=share_cmds.cmd_push)
