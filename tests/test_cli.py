"""Every command is configured one way (a pydantic model whose fields are its flags): each flag is
listed once with help, nested teacher settings keep their flag names, values are validated with
the flag named in the error, and the service's DISTILL_* variables still configure it."""

import argparse
import os
from unittest import mock

import pytest
from conftest import run_cli

import distill_demo.__main__ as demo_cli
import shards.__main__ as shards_cli
import student_trainer.__main__ as trainer_cli
import teacher_service.__main__ as teacher_cli
from distill_core import ConfigError

APPS = [shards_cli.APP, teacher_cli.APP, trainer_cli.APP]


def leaf_parsers(parser: argparse.ArgumentParser, path=()):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for sub in subs:
        for name, p in sub.choices.items():
            yield from leaf_parsers(p, (*path, name))


@pytest.mark.unit
def test_every_flag_once_with_help():
    seen = 0
    for app in APPS:
        for path, parser in leaf_parsers(app.parser()):
            flags = [s for a in parser._actions for s in a.option_strings]
            assert len(flags) == len(set(flags)), (path, flags)
            for action in parser._actions:
                if isinstance(action, argparse._HelpAction):
                    continue
                assert action.help and len(action.help) > 8, (path, action.dest)
                assert action.help.count("(default:") <= 1, (path, action.help)
                seen += 1
    assert seen > 80  # the walk really reached the commands


@pytest.mark.unit
def test_secrets_are_never_flags():
    """`ps` shows every process's arguments: tokens come from the environment or a file."""
    serve = next(p for path, p in leaf_parsers(teacher_cli.APP.parser()) if path == ("serve",))
    train = next(p for path, p in leaf_parsers(trainer_cli.APP.parser()) if path == ("train",))
    serve_flags = {s for a in serve._actions for s in a.option_strings}
    train_flags = {s for a in train._actions for s in a.option_strings}
    assert "--token" not in serve_flags and "--token-file" in serve_flags
    assert "--service-token" not in train_flags and "--service-token-file" in train_flags
    with mock.patch.dict(os.environ, {"DISTILL_TOKEN": "from-env"}):
        _, cfg = trainer_cli.APP.parse(["train", "--shards", "s", "--out", "o"])
    assert cfg.service_token == "from-env" and "service_token" not in cfg.model_dump()  # never in a checkpoint


@pytest.mark.unit
def test_teacher_settings_nest_under_each_command():
    _, pre = teacher_cli.APP.parse(["precompute", "--shards", "s", "--seeds", "0:4", "--checkpoint", "t.safetensors"])
    assert pre.teacher.checkpoint == "t.safetensors" and pre.teacher.amp == "auto"
    _, train = trainer_cli.APP.parse(
        ["train", "--shards", "s", "--out", "o", "--labels", "online", "--teacher-checkpoint", "t.safetensors"]
    )
    assert train.teacher.checkpoint == "t.safetensors" and train.distillation_type == "hard"


def test_every_augmenting_command_takes_the_renderer(demo_shards):
    """--renderer reaches the policy of serve (flag and DISTILL_RENDERER), precompute, the trainer
    and the demo; an unknown renderer is refused by argparse."""
    from teacher_service.app.state import policy_and_classes

    _, s = teacher_cli.APP.parse(["serve", "--shards", str(demo_shards), "--renderer", "torch"])
    assert policy_and_classes(s)[0].renderer == "torch"
    with mock.patch.dict(os.environ, {"DISTILL_RENDERER": "torch"}):
        _, s = teacher_cli.APP.parse(["serve", "--shards", str(demo_shards)])
    assert policy_and_classes(s)[0].renderer == "torch"
    _, pre = teacher_cli.APP.parse(["precompute", "--shards", "s", "--seeds", "0:1", "--renderer", "torch"])
    _, train = trainer_cli.APP.parse(["train", "--shards", "s", "--out", "o", "--renderer", "torch"])
    _, demo = demo_cli.APP.parse(["demo", "--renderer", "torch"])
    assert pre.renderer == train.renderer == demo.renderer == "torch"
    with pytest.raises(SystemExit):
        trainer_cli.APP.parse(["train", "--shards", "s", "--out", "o", "--renderer", "cv2"])


def test_refused_values_name_their_flag():
    with pytest.raises(ConfigError, match="--shard-size"):
        shards_cli.APP.parse(["build", "--demo", "digits", "--out", "x", "--shard-size", "0"])
    with pytest.raises(ConfigError, match="--labels store needs --store"):
        trainer_cli.APP.parse(["train", "--shards", "s", "--out", "o", "--labels", "store"])
    with pytest.raises(ConfigError, match="exactly one teacher weight source"):
        trainer_cli.APP.parse(["train", "--shards", "s", "--out", "o", "--labels", "online"])
    with pytest.raises(SystemExit):  # argparse: not JSON
        trainer_cli.APP.parse(["train", "--shards", "s", "--out", "o", "--model-kwargs", "{oops"])
    r = run_cli("shards", "build", "--demo", "digits", "--out", "x", "--val-fraction", "1.5", check=False)
    assert r.returncode == 2 and r.stderr.startswith("ERROR --val-fraction")


@pytest.mark.unit
def test_service_flags_and_environment():
    env = {"DISTILL_CHECKPOINT": "/w/teacher.safetensors", "DISTILL_MAX_BATCH_SIZE": "32", "DISTILL_AMP": "fp16"}
    with mock.patch.dict(os.environ, env):
        _, s = teacher_cli.APP.parse(["serve", "--amp", "none", "--policy", '{"input_size": 64}'])
        assert s.teacher.checkpoint == "/w/teacher.safetensors"  # flat name of a nested setting
        assert s.teacher.amp == "none"  # the flag wins over the environment
        assert s.max_batch_size == 32 and s.policy == {"input_size": 64}
        exported = s.to_env()
    assert exported["DISTILL_CHECKPOINT"] == "/w/teacher.safetensors" and exported["DISTILL_AMP"] == "none"
    with mock.patch.dict(os.environ, exported, clear=True):  # what serve's HTTP workers read back
        from teacher_service.app.config import Settings

        assert Settings() == s


@pytest.mark.unit
def test_to_argv_is_the_inverse_of_the_parser(tmp_path):
    """Code that starts a command builds its arguments from the command's model (`to_argv`): the
    command's parser gives the same model back."""
    import argparse

    from distill_core import add_arguments, from_arguments, to_argv
    from labels.teacher import TeacherSettings
    from shards.build import BuildConfig
    from student_trainer import TrainConfig
    from teacher_service.precompute import PrecomputeConfig

    ckpt = tmp_path / "t.safetensors"
    ckpt.write_bytes(b"x")
    configs = [
        BuildConfig(demo="digits", out=tmp_path / "s", shard_size=128),
        PrecomputeConfig(shards="s", epochs=3, repeated_aug=1, teacher=TeacherSettings(checkpoint=str(ckpt)),
                         progress=False, policy={"input_size": 48}),
        TrainConfig(shards="s", out="o", labels="online", teacher=TeacherSettings(checkpoint=str(ckpt)),
                    model_kwargs={"depth": 2}, export=False, clip_grad=1.0, renderer="torch"),
    ]  # fmt: skip
    for cfg in configs:
        argv = to_argv(cfg)
        parser = add_arguments(argparse.ArgumentParser(), type(cfg))
        assert from_arguments(type(cfg), parser.parse_args(argv)) == cfg, argv
    assert "--teacher-checkpoint" in argv and "--no-export" in argv and '{"depth": 2}' in argv


@pytest.mark.unit
def test_urls_with_secrets_never_reach_a_command_line(tmp_path, monkeypatch, capsys):
    """A store URL with a password, in front of the host or as a query parameter (also
    percent-encoded, as redis-py decodes it: `?%70assword=`), is refused on every command line and
    masked wherever it is shown; env:NAME and @FILE name it instead."""
    from distill_core.secrets import redact, resolve_url, url_has_secret
    from teacher_service.__main__ import APP

    for url in ("redis://:pw@h:6379/0", "redis://u:pw@h/0", "rediss://h/0?password=pw", "redis://h/0?%70assword=pw",
                "redis://h/0?a=1&pass%77ord=pw"):  # fmt: skip
        assert url_has_secret(url) and "pw" not in redact(url), url
        code = APP.main(["labels", "stats", url, "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and "pw" not in err and "env:NAME" in err, err
    assert not url_has_secret("redis://h:6379/0?cluster=1") and not url_has_secret("runs/labels.db")
    monkeypatch.setenv("MY_STORE", "redis://:pw@h/0")
    (tmp_path / "store.url").write_text("redis://:pw@h/1\n")
    assert (
        resolve_url("env:MY_STORE") == "redis://:pw@h/0"
        and resolve_url(f"@{tmp_path / 'store.url'}") == "redis://:pw@h/1"
    )
    with pytest.raises(ValueError, match="NOT_SET is not set"):
        resolve_url("env:NOT_SET")
