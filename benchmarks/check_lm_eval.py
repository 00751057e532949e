"""lm-evaluation-harness through ``offload serve``, against lm-eval's own Hugging Face backend.

Builds a tiny Llama with a locally trained BPE tokenizer and a 40-question multiple-choice task from a
local JSONL file (no hub), then runs the task twice with the same ``lm_eval``: once as
``local-completions`` against ``offload serve`` (the smallest ``--cpu-memory``: every block streamed; lm-eval sends token-id prompts
with ``echo``, ``logprobs=1``, ``max_tokens=1`` and reads each continuation's log-probability), once with
``--model hf`` on the same folder in fp32. Prints (and writes as JSON) the accuracy of both, how many
documents got the same verdict and the largest difference in a choice's log-likelihood.

lm-eval is not a dependency of offload: install it where you like (``pip install "lm-eval[api]"``, a
venv with ``--system-site-packages`` sees torch and offload) and pass its executable with ``--lm-eval``.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

CORPUS = ["the cat sat on the mat", "a dog runs in the park", "what color is the sky? blue", "two plus two is four",
          "the sun rises in the east", "water is wet and cold"] * 10
TASK = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def build(root: str, questions: int) -> None:
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                        special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    t = tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(t), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=t.eos_token_id, bos_token_id=t.bos_token_id)
    tf.LlamaForCausalLM(cfg).eval().save_pretrained(os.path.join(root, "model"))
    t.save_pretrained(os.path.join(root, "model"))
    rng = random.Random(0)
    with open(os.path.join(root, "data.jsonl"), "w") as f:
        for _ in range(questions):
            q = " ".join(rng.choice(CORPUS).split()[:rng.randint(2, 5)])
            choices = [" " + rng.choice(CORPUS).split()[rng.randint(0, 3)] for _ in range(4)]
            f.write(json.dumps({"question": q, "choices": choices, "answer": rng.randrange(4)}) + "\n")
    with open(os.path.join(root, "tiny_mc.yaml"), "w") as f:
        f.write(TASK.format(data=os.path.join(root, "data.jsonl")))


def samples(out: str) -> dict[int, dict]:
    path = glob.glob(os.path.join(out, "**", "samples_tiny_mc_*.jsonl"), recursive=True)[0]
    with open(path) as f:
        return {s["doc_id"]: s for s in map(json.loads, f)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lm-eval", default="lm_eval", help="the lm_eval executable")
    p.add_argument("--questions", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per lm-eval request (and serve's rows)")
    p.add_argument("--json", help="write the result here")
    a = p.parse_args()
    root = tempfile.mkdtemp(prefix="offload-lm-eval-")
    build(root, a.questions)
    env = dict(os.environ, OFFLOAD_CACHE=os.path.join(root, "cache"), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               PYTHONUNBUFFERED="1")
    dry = subprocess.run([sys.executable, "-m", "offload", "run", os.path.join(root, "model"), "--dry-run",
                          "--cpu-memory", "1"], capture_output=True, text=True, env=env)
    least = re.search(r"pass --cpu-memory (\S+) or more", dry.stderr)  # the smallest: every block streams
    if least is None:
        print(dry.stderr, file=sys.stderr)
        return 1
    server = subprocess.Popen([sys.executable, "-m", "offload", "serve", os.path.join(root, "model"), "--port", "0",
                               "--model-name", "tiny", "--batch-size", str(a.batch_size), "--cpu-memory",
                               least.group(1), "-q"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    port = None
    for line in server.stdout:  # type: ignore[union-attr]
        print(line, end="", file=sys.stderr)
        if m := re.search(r"at http://127\.0\.0\.1:(\d+)/v1", line):
            port = int(m.group(1))
            break
    if port is None:
        print("offload serve did not start", file=sys.stderr)
        return 1
    threading.Thread(target=server.stdout.read, daemon=True).start()  # type: ignore[union-attr]  # never a full pipe
    common = ["--tasks", "tiny_mc", "--include_path", root, "--log_samples"]
    try:
        t0 = time.perf_counter()
        subprocess.run([a.lm_eval, "run", "--model", "local-completions", "--model_args",
                        f"model=tiny,base_url=http://127.0.0.1:{port}/v1/completions,tokenizer={root}/model,"
                        f"tokenized_requests=True,num_concurrent=2,max_retries=1", "--batch_size", str(a.batch_size),
                        "--output_path", os.path.join(root, "out-offload"), *common], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        served_s = time.perf_counter() - t0
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(60)
    subprocess.run([a.lm_eval, "run", "--model", "hf", "--model_args", f"pretrained={root}/model,dtype=float32",
                    "--output_path", os.path.join(root, "out-hf"), *common], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    got, want = samples(os.path.join(root, "out-offload")), samples(os.path.join(root, "out-hf"))
    diff = max(abs(float(x[0][0]) - float(y[0][0])) for k in want for x, y in zip(got[k]["resps"], want[k]["resps"]))
    result = {"documents": len(want), "choices": sum(len(s["resps"]) for s in want.values()),
              "acc_offload_serve": sum(s["acc"] for s in got.values()) / len(got),
              "acc_lm_eval_hf": sum(s["acc"] for s in want.values()) / len(want),
              "same_verdict": sum(got[k]["acc"] == want[k]["acc"] for k in want),
              "max_abs_loglikelihood_difference": diff, "served_seconds": served_s, "batch_size": a.batch_size}
    print(json.dumps(result, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if result["same_verdict"] == len(want) and diff < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
