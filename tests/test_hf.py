"""A Hugging Face `transformers` causal LM (train.tasks.hf) on a token corpus: its errors, DDP and
FSDP2 alike, a local model directory, and recovery from a SIGKILLed worker bit-identical to the
failure-free run (Ray, under DDP and FSDP2)."""

import os
import sys

import pytest
import torch
import transformers  # noqa: F401  (an optional extra, installed by `make install`)

from conftest import ROOT, run_cli, run_events, run_summary
from dist_harness import run_world
from train.state import weights_digest
from train.tasks.hf import HFCausalLM

sys.path.insert(0, os.path.join(ROOT, "scripts"))
from prepare_tokens import prepare  # noqa: E402

TASK = "train.tasks.hf:HFCausalLM"
GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("corpus") / "readme.bin")
    prepare(out, [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "docs", "operations.md")],
            progress=None)
    return out


def _yaml(d):
    return "{" + ", ".join(f"{k}: {_yaml(v) if isinstance(v, dict) else v}"
                           for k, v in d.items()) + "}"


@pytest.mark.unit
def test_bad_task_args_name_the_setting(corpus, tmp_path):
    with pytest.raises(ValueError, match="give one of model .* or model_dir"):
        HFCausalLM(path=corpus)
    with pytest.raises(ValueError, match="needs a model_type"):
        HFCausalLM(path=corpus, model={"n_layer": 2})
    with pytest.raises(ValueError, match="seq_len=128 is longer than the model takes \\(64\\)"):
        HFCausalLM(path=corpus, model=GPT2, seq_len=128)
    with pytest.raises(ValueError, match="model_dir="):
        HFCausalLM(path=corpus, model_dir=str(tmp_path / "no model here"))


@pytest.mark.unit
def test_a_local_model_directory_loads_its_weights(corpus, tmp_path):
    task = HFCausalLM(path=corpus, model=GPT2, seq_len=32)
    torch.manual_seed(3)
    saved = task.build_model()
    assert saved.config.vocab_size == 256 and saved.config.eos_token_id is None
    saved.save_pretrained(tmp_path / "m")
    loaded = HFCausalLM(path=corpus, model_dir=str(tmp_path / "m"), seq_len=32).build_model()
    assert weights_digest(loaded.state_dict()) == weights_digest(saved.state_dict())
    assert [type(b).__name__ for b in task.fsdp_units(saved)] == ["GPT2Block"] * 2
    with pytest.raises(ValueError, match="smaller than the corpus's \\(300\\)"):
        HFCausalLM(path=corpus, model_dir=str(tmp_path / "m"), seq_len=32, vocab_size=300)


@pytest.mark.unit
def test_ddp_and_fsdp2_train_it_to_the_same_weights(corpus):
    args = {"path": corpus, "seq_len": 32, "model": GPT2}
    ddp, losses = run_world(2, "ddp", steps=4, task=TASK, task_args=args, gbs=8)
    fsdp, fsdp_losses = run_world(2, "fsdp", steps=4, task=TASK, task_args=args, gbs=8)
    assert weights_digest(ddp) == weights_digest(fsdp) and losses == fsdp_losses
    assert abs(losses[0] - torch.log(torch.tensor(256.0)).item()) < 0.5


@pytest.mark.e2e
@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_a_killed_worker_recovers_bit_identical(corpus, tmp_path, parallelism):
    steps, gbs = 40, 8
    args = {"path": corpus, "seq_len": 32, "model": GPT2}
    run_dir = tmp_path / "run"
    proc = run_cli(["run", os.path.join(ROOT, "configs", "local_cpu.yaml"), f"run.dir={run_dir}",
                    f"train.task={TASK}", f"train.task_args={_yaml(args)}",
                    f"train.steps={steps}", f"train.global_batch_size={gbs}",
                    f"train.parallelism={parallelism}", "checkpoint.interval_steps=10",
                    "train.eval_interval_steps=20", "train.eval_samples=8",
                    "chaos.events=[{at_step: 15, action: kill_worker, target: 2}]"], timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = run_summary(run_dir)
    assert s["status"] == "finished" and s["steps"] == steps and s["recoveries"] >= 1
    assert any(e["event"] == "failure_detected" for e in run_events(run_dir))
    state, _ = run_world(4, parallelism, steps=steps, task=TASK, task_args=args, gbs=gbs)
    assert s["weights_digest"] == weights_digest(state), "bit-identical to the failure-free run"
    assert s["final_eval_loss"] is not None and "Traceback" not in proc.stdout
