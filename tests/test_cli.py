"""The command line as a new user meets it: one-line errors (exit 2) instead of tracebacks, the server's
max_tokens rule, a prefill notice for long CPU prompts, Ctrl-C in chat, --version and help on every flag."""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qserve_lite import cli
from qserve_lite._version import __version__
from qserve_lite.cli import build_parser, main
from qserve_lite.engine.llm_engine import LLMEngine
from qserve_lite.model.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def one_line_error(capsys, rc: int) -> str:
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("qserve-lite: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


# ---- 1. one-line errors ----


def test_config_json_array_is_one_line_error(tiny_model_dir, tmp_path, capsys):
    model = tmp_path / "m"
    model.mkdir()
    for f in tiny_model_dir.iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    (model / "config.json").write_text("[1, 2, 3]")
    err = one_line_error(capsys, main(["generate", "--model", str(model), "--prompt", "hi"]))
    assert f"{model / 'config.json'}: expected a JSON object, got an array" in err


def test_config_json_array_in_a_real_process(tmp_path):
    """The installed entry point's path end to end: no traceback on stderr, exit status 2."""
    (tmp_path / "config.json").write_text("[]")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-m", "qserve_lite.cli", "generate", "--model", str(tmp_path),
                          "--prompt", "hi"], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    want = f"qserve-lite: error: {tmp_path / 'config.json'}: expected a JSON object, got an array\n"
    assert res.stderr == want


def test_unwritable_cache_is_one_line_error(tmp_path, monkeypatch, capsys):
    pytest.importorskip("gguf")
    blocker = tmp_path / "cache-file"
    blocker.write_text("x")
    monkeypatch.setenv("QSERVE_LITE_CACHE", str(blocker))
    err = one_line_error(capsys, main(["generate", "--prompt", "hi"]))
    assert str(blocker) in err and "set QSERVE_LITE_CACHE to a writable directory" in err


# ---- 2. max_tokens and the prompt length ----


def test_max_tokens_beyond_max_model_len_is_refused(tiny_model_dir, capsys):
    base = ["--model", str(tiny_model_dir), "--device", "cpu"]
    err = one_line_error(capsys, main(["generate", *base, "--prompt", "hi", "--max-tokens", "1000000000"]))
    assert ("max_tokens is 1000000000, but this model's maximum context length is 256 tokens (prompt + "
            "output): give --max-tokens 256 or less\n") in err
    err = one_line_error(capsys, main(["generate", *base, "--prompt", "hi", "--max-tokens", "100",
                                       "--max-model-len", "64"]))
    assert "give --max-tokens 64 or less (or raise --max-model-len)" in err
    err = one_line_error(capsys, main(["chat", *base, "--max-tokens", "257"]))
    assert "max_tokens is 257" in err


def test_default_max_tokens_still_fits_a_small_max_model_len(tiny_model_dir, capsys):
    """Only an explicit --max-tokens is checked: the default (256) is capped by the engine as before."""
    rc = main(["generate", "--model", str(tiny_model_dir), "--device", "cpu", "--prompt", "hi",
               "--max-model-len", "32", "--ignore-eos"])
    assert rc == 0
    assert "finish=length" in capsys.readouterr().err


def test_too_long_prompt_is_one_line_naming_the_flags(tiny_model_dir, capsys):
    prompt = "The capital of France is Paris. " * 40
    err = one_line_error(capsys, main(["generate", "--model", str(tiny_model_dir), "--device", "cpu",
                                       "--prompt", prompt, "--max-model-len", "64"]))
    assert "at most 63 fit" in err and "--max-model-len" in err and "--num-pages" in err


# ---- 3. prefill notice ----


def run_generate_with_stderr(tiny_model_dir, monkeypatch, stderr, prompt: str) -> str:
    monkeypatch.setattr(cli, "PREFILL_NOTICE_TOKENS", 30)
    monkeypatch.setattr("sys.stderr", stderr)
    rc = main(["generate", "--model", str(tiny_model_dir), "--device", "cpu", "--prompt", prompt,
               "--max-tokens", "3", "--ignore-eos"])
    assert rc == 0
    return stderr.getvalue()


LONG = "The capital of France is Paris. The capital of Italy is Rome. " * 4


def test_prefill_notice_for_a_long_cpu_prompt(tiny_model_dir, monkeypatch, capsys):
    screen = FakeTTY()  # stdout and stderr on one terminal: the notice's line must end before the answer
    monkeypatch.setattr("sys.stdout", screen)
    err = run_generate_with_stderr(tiny_model_dir, monkeypatch, screen, LONG)
    assert err.startswith("\rqserve-lite: prefilling ") and " prompt tokens on the CPU ..." in err
    notice, rest = err.split("tok/s)\n", 1)
    assert "\rqserve-lite: prefilled " in notice and "\n" not in notice
    n = int(notice.split("prefilled ")[1].split()[0])
    assert n >= 30 and f"\n[{n} prompt + 3 generated tokens" in rest


def test_no_prefill_notice_for_a_short_prompt(tiny_model_dir, monkeypatch, capsys):
    err = run_generate_with_stderr(tiny_model_dir, monkeypatch, FakeTTY(), "Hello")
    assert "prefill" not in err


def test_no_prefill_notice_when_stderr_is_not_a_terminal(tiny_model_dir, monkeypatch, capsys):
    err = run_generate_with_stderr(tiny_model_dir, monkeypatch, io.StringIO(), LONG)
    assert "prefill" not in err and "prompt + 3 generated tokens" in err


def test_prefill_notice_with_no_stream(tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setattr(cli, "PREFILL_NOTICE_TOKENS", 30)
    err = FakeTTY()
    monkeypatch.setattr("sys.stderr", err)
    assert main(["generate", "--model", str(tiny_model_dir), "--device", "cpu", "--prompt", LONG,
                 "--max-tokens", "3", "--no-stream"]) == 0
    assert err.getvalue().count("qserve-lite: prefilled ") == 1


# ---- 4. chat and Ctrl-C ----


@pytest.fixture
def chat_log(monkeypatch):
    """The conversations the chat sends to the model, in order."""
    sent: list[list[dict]] = []
    encode_chat = Tokenizer.encode_chat

    def recording(self, messages, *args, **kwargs):
        sent.append([dict(m) for m in messages])
        return encode_chat(self, messages, *args, **kwargs)

    monkeypatch.setattr(Tokenizer, "encode_chat", recording)
    return sent


def interrupt_engine(monkeypatch, after_text: bool) -> None:
    """Ctrl-C inside the engine's step(), once: on the first step (before any text), or on the first step
    after some text has been generated (so part of the reply is on screen)."""
    step = LLMEngine.step
    state = {"armed": not after_text, "done": False}

    def step_or_interrupt(self):
        if state["armed"] and not state["done"]:
            state["done"] = True
            raise KeyboardInterrupt
        outs = step(self)
        if any(o.outputs[0].text for o in outs):
            state["armed"] = True
        return outs

    monkeypatch.setattr(LLMEngine, "step", step_or_interrupt)


def chat(tiny_model_dir, monkeypatch, lines: str) -> int:
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    return main(["chat", "--model", str(tiny_model_dir), "--device", "cpu", "--max-tokens", "12",
                 "--ignore-eos"])


def test_ctrl_c_during_a_reply_keeps_the_session_and_the_partial_reply(tiny_model_dir, monkeypatch, capsys,
                                                                       chat_log):
    interrupt_engine(monkeypatch, after_text=True)
    assert chat(tiny_model_dir, monkeypatch, "Hello\nHow are you\n") == 0  # EOF ends the chat
    out, err = capsys.readouterr()
    assert "[reply interrupted; the part shown is kept in the history (/reset to forget)]" in err
    partial, second = out.split("\n")[:2]
    assert partial and second
    assert [m["role"] for m in chat_log[1]] == ["user", "assistant", "user"]
    assert chat_log[1][1]["content"] == partial and chat_log[1][2]["content"] == "How are you"


def test_ctrl_c_before_the_reply_begins_drops_the_turn(tiny_model_dir, monkeypatch, capsys, chat_log):
    interrupt_engine(monkeypatch, after_text=False)
    assert chat(tiny_model_dir, monkeypatch, "Hello\nHow are you\n/exit\n") == 0
    err = capsys.readouterr().err
    assert "[reply interrupted before it began; this turn is dropped]" in err
    assert chat_log[1] == [{"role": "user", "content": "How are you"}]


def test_ctrl_c_at_the_prompt_ends_the_chat(tiny_model_dir, monkeypatch, capsys):
    class InterruptedStdin(io.StringIO):
        def readline(self, *args):
            raise KeyboardInterrupt

    monkeypatch.setattr("sys.stdin", InterruptedStdin())
    assert main(["chat", "--model", str(tiny_model_dir), "--device", "cpu"]) == 130
    assert "qserve-lite: interrupted" in capsys.readouterr().err


# ---- 5. --version and help ----


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"qserve-lite {__version__}\n"


# options of the `serve` subcommand without help yet: the server's owner adds them (then empty this set)
SERVE_HELP_TODO: set[tuple[str, str]] = set()


def test_every_option_of_every_subcommand_has_help():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {"generate", "chat"} <= set(subparsers.choices)
    missing = []
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            label = (name, action.option_strings[0] if action.option_strings else action.dest)
            if not (action.help and action.help.strip()) and label not in SERVE_HELP_TODO:
                missing.append(label)
    assert not missing, f"options without help: {missing}"
