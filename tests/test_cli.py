"""The command line and run.sh: errors that must stop a run before any process group exists, secrets that must
never be written, and user input that must reach the launcher exactly as typed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, base_config, ds_train, write_config

SECRET = "wandb-key-0123456789abcdef0123456789"


def _train_error(cfg: dict, tmp_path, env=None) -> str:
    """The one-line config error (exit 2) `ds-train train` stops with, before any process group."""
    proc = ds_train(["train", str(write_config(tmp_path / "c.yaml", cfg))], env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    # DeepSpeed announces its process group with this line; none may have been made.
    assert "Initializing TorchBackend" not in proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ds-train train: config error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def test_help_and_unknown_command():
    assert "consolidate CHECKPOINT_DIR OUT_DIR" in ds_train(["--help"]).stdout
    proc = ds_train(["trian"])
    assert proc.returncode == 2 and "unknown command 'trian'" in proc.stderr


def test_environment_errors_stop_before_process_group(tiny_model, demo_data, tmp_path, monkeypatch):
    """`ds-train train` checks its inputs (train.check_inputs) before it starts a process group: one launch shows
    such an error ends the command that way (exit 2, one line, no traceback, no process group); each case below is
    then checked in this process by the same function (a launch each would cost ~5 s for the same code path)."""
    from ds_train.config import load_config
    from ds_train.errors import ConfigError
    from ds_train.train import check_inputs

    def error(cfg: dict, **env) -> str:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        with pytest.raises(ConfigError) as e:
            check_inputs(load_config(str(write_config(tmp_path / "c.yaml", cfg))))
        for name in env:
            monkeypatch.delenv(name)
        return str(e.value)

    # The config every case below breaks in one place passes the same checks: each error comes from its change.
    ok = base_config(tiny_model, demo_data, tmp_path / "out")
    assert check_inputs(load_config(str(write_config(tmp_path / "ok.yaml", ok))))[0].out_dir == tmp_path / "out"

    bad = base_config(tiny_model, demo_data, tmp_path / "out")
    bad["model"]["path"] = str(tmp_path / "no_model")
    assert f"model.path={tmp_path / 'no_model'} does not exist" in _train_error(bad, tmp_path)
    assert f"model.path={tmp_path / 'no_model'} does not exist" in error(bad)

    tok_dir = tmp_path / "tok_without_specials"
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab={"a": 0}, merges=[]))).save_pretrained(tok_dir)
    bad = base_config(tiny_model, demo_data, tmp_path / "out", model={"tokenizer_path": str(tok_dir)})
    assert "lacks the Higgs audio special tokens" in error(bad)

    other = tmp_path / "audio_tok_4"
    shutil.copytree(tiny_model / "audio_tokenizer", other)
    conf = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**conf, "n_q": 4}))
    bad = base_config(tiny_model, demo_data, tmp_path / "out", model={"audio_tokenizer_path": str(other)})
    assert "has 4 codebooks but the model has 8" in error(bad)

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_batch_size": 16}))
    bad = base_config(tiny_model, demo_data, tmp_path / "out", train={"deepspeed_config": str(ds)})
    assert "train_batch_size=16 but our config gives 4" in error(bad, WORLD_SIZE="4")

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    bad = base_config(tiny_model, demo_data, blocker / "out")
    assert "is not writable" in error(bad)

    previous = tmp_path / "previous_run"
    (previous / "checkpoints" / "step-000010").mkdir(parents=True)
    (previous / "checkpoints" / "latest").write_text("step-000010")
    bad = base_config(tiny_model, demo_data, previous)
    assert "already holds checkpoints of a run; set train.resume=auto" in error(bad)
    bad = base_config(tiny_model, demo_data, tmp_path / "fresh", train={"resume": "auto"})
    assert "no complete checkpoint" in error(bad)


@pytest.mark.parametrize("text, line", [
    ("node1 slots=8\nnode2 slot=8\n", 2),
    ("# comment\nnode1 slots=0\n", 2),
    ("node1 slots=4\n\nnode1 slots=4\n", 3),
    ("node1\n", 1),
])
def test_hostfile_syntax_errors_name_the_line(tmp_path, text, line):
    hostfile = tmp_path / "hosts"
    hostfile.write_text(text)
    proc = subprocess.run([str(REPO / "run.sh"), "train", "x.yaml", "--hostfile", str(hostfile)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"hostfile error: {hostfile}:{line}:" in proc.stderr


def test_shipped_hostfiles_parse():
    from ds_train.launch import parse_hostfile

    assert parse_hostfile(str(REPO / "hostfiles/localhost")) == [("localhost", 2)]
    assert parse_hostfile(str(REPO / "hostfiles/two_nodes_8gpu")) == [("node001", 8), ("node002", 8)]


def test_trust_remote_code_stays_off(tiny_model, tmp_path):
    """A tokenizer whose config asks for custom code: loading it must not run that code unless the config says so.
    With model.trust_remote_code=false (the default) transformers loads the built-in class the config also names
    (`tokenizer_class`, here PreTrainedTokenizerFast: the tokenizer.json the model was trained with) and ignores
    `auto_map`; ds_train keeps that, since the Higgs special-token checks still run on it. A config that names only
    the custom class cannot load without the code: that is a config error naming the switch."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from ds_train.config import load_config
    from ds_train.errors import ConfigError
    from ds_train.preflight import load_model_config, load_text_tokenizer

    tok = tmp_path / "remote_tok"
    shutil.copytree(tiny_model, tok, ignore=shutil.ignore_patterns("*.safetensors", "audio_tokenizer"))
    marker = tmp_path / "remote_code_ran"
    (tok / "evil_tok.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                     "from transformers import PreTrainedTokenizerFast\n"
                                     "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    conf = json.loads((tok / "tokenizer_config.json").read_text())
    conf["auto_map"] = {"AutoTokenizer": [None, "evil_tok.EvilTokenizer"]}
    (tok / "tokenizer_config.json").write_text(json.dumps(conf))
    base = [f"model.path={tiny_model}", f"model.audio_tokenizer_path={tiny_model}/audio_tokenizer",
            "data.train_file=x.jsonl", "train.output_dir=o", f"model.tokenizer_path={tok}"]
    cfg = load_config(None, base)
    assert cfg.model.trust_remote_code is False
    model_config = load_model_config(str(tiny_model))
    loaded = load_text_tokenizer(cfg, model_config)
    assert type(loaded) is PreTrainedTokenizerFast and not marker.exists()
    assert loaded.get_vocab() == AutoTokenizer.from_pretrained(str(tiny_model)).get_vocab()
    only_custom = tmp_path / "only_custom"
    shutil.copytree(tok, only_custom)
    (only_custom / "tokenizer_config.json").write_text(json.dumps({**conf, "tokenizer_class": "EvilTokenizer"}))
    with pytest.raises(ConfigError, match=r"cannot load the text tokenizer from .*only_custom.*trust_remote_code"):
        load_text_tokenizer(load_config(None, [*base, f"model.tokenizer_path={only_custom}"]), model_config)
    assert not marker.exists()
    # The same directory with the switch on does run it: the check above can fail. In a subprocess, because
    # transformers registers loaded remote classes globally and that would leak into later tests.
    code = ("from ds_train.config import load_config; from ds_train.preflight import load_model_config, load_text_tokenizer;"
            f"load_text_tokenizer(load_config(None, {[*base, 'model.trust_remote_code=true']!r}), "
            f"load_model_config({str(tiny_model)!r}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert marker.exists()


@pytest.mark.slow
def test_secrets_never_written_and_run_sh_passes_input_verbatim(tiny_model, demo_data, tmp_path):
    out = tmp_path / "secret_run"
    tricky = "a b;touch PWNED_$(id -u) 'q'"
    cfg = base_config(tiny_model, demo_data, out, train={"max_steps": 2},
                      wandb={"mode": "offline", "project": "ds_train_test", "tags": [SECRET]})
    config = write_config(tmp_path / "s.yaml", cfg)
    env = {**os.environ, "WANDB_API_KEY": SECRET, "HF_TOKEN": "hf_" + SECRET, "LOCAL_SIZE": "2",
           "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    # (A credential typed on the command line is visible in `ps` and launcher logs; the config file is the place.)
    proc = subprocess.run([str(REPO / "run.sh"), "train", str(config), f"wandb.run_name={tricky}",
                           "--master_port", "29655"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not list(tmp_path.glob("PWNED*")) and not list(REPO.glob("PWNED*"))
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["wandb"]["run_name"] == tricky  # reached the trainer exactly as typed
    assert saved["wandb"]["tags"] == ["***"]  # a value equal to a credential is redacted

    written = [proc.stdout, proc.stderr] + [p.read_text(errors="ignore") for p in out.rglob("*")
                                            if p.is_file() and p.suffix in (".jsonl", ".yaml", ".json", ".log", ".txt")]
    wandb_files = list(out.rglob("wandb/*/files/*")) + list(out.rglob("*.wandb"))
    assert wandb_files, "offline W&B run was not written"
    written += [p.read_bytes().decode("latin-1") for p in wandb_files if p.is_file()]
    for text in written:
        assert SECRET not in text



# ---- exit codes, one message per failure (issue 11) -------------------------------------------------------------

def _run_sh(args, tmp_path, timeout=300):
    env = {**os.environ, "LOCAL_SIZE": "2", "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(REPO / "run.sh"), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_run_sh_train_help_prints_without_launching(tmp_path):
    proc = _run_sh(["train", "--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ds-train train CONFIG.yaml" in proc.stdout and "75 preempted or Ctrl-C" in proc.stdout
    assert "deepspeed" not in proc.stderr  # run.sh logs the launcher command line when it launches


@pytest.mark.slow
def test_an_unexpected_error_on_every_rank_prints_one_traceback(tiny_model, demo_data, tmp_path):
    # A bug every rank hits (DS_TRAIN_FAULT=error:1 raises a RuntimeError in the first step): one traceback per node,
    # the other rank says so in one line; the exit code is the generic error, 1.
    from conftest import launch

    cfg = base_config(tiny_model, demo_data, tmp_path / "out", train={"max_steps": 2})
    proc = launch(["train", str(write_config(tmp_path / "c.yaml", cfg))], env={"DS_TRAIN_FAULT": "error:1"},
                  check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.count("Traceback (most recent call last)") == 1, proc.stderr[-6000:]
    assert proc.stderr.count("InjectedError: error injected at step 1 (DS_TRAIN_FAULT)") == 1, proc.stderr[-6000:]
    assert proc.stderr.count("): unexpected error") == 1
    assert proc.stderr.count("): failed with the same error (traceback above)") == 1


def test_config_and_data_errors_are_reported_once_and_explained(tiny_model, demo_data, tmp_path):
    # Both ranks find the same problem; rank 0 alone reports it, the exit code passes through run.sh, which explains
    # it, and no rank ends in gloo's "terminate called without an active exception" (rc 250, seen 1 in 4 before).
    cfg = base_config(tiny_model, demo_data, tmp_path / "out")
    cfg["optim"]["weight_decay"] = -1
    proc = _run_sh(["train", str(write_config(tmp_path / "c.yaml", cfg)), "--master_port", "29657"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count("optim.weight_decay must be >= 0") == 1, proc.stderr[-3000:]
    assert "[run.sh] exit 2: configuration error" in proc.stderr

    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    with open(data / "train.jsonl", "a") as f:
        f.write('{"audio": "wavs/missing.wav", "text": "gone"}\n')
    cfg = base_config(tiny_model, data, tmp_path / "out2")
    proc = _run_sh(["train", str(write_config(tmp_path / "d.yaml", cfg)), "--master_port", "29658"], tmp_path)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert proc.stderr.count("1 bad sample(s)") == 1 and "train.jsonl:9" in proc.stderr, proc.stderr[-3000:]
    assert "terminate called" not in proc.stderr and "Traceback" not in proc.stderr
    assert "[run.sh] exit 3: data or checkpoint error" in proc.stderr
