"""cg4ctr-export: every user error is one `cg4ctr-export: error:` line, exit 2, refused before any model loads."""
from __future__ import annotations

import math

import pytest

from cg4ctr_fast.cli.main import MAX_CREATIVES
from cg4ctr_fast.errors import InputError


def _export(*args: str) -> int:
    from cg4ctr_fast.cli.export import main

    try:
        return main(list(args))
    except SystemExit as exc:
        return int(exc.code)


def _one_error_line(capsys, code: int) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("cg4ctr-export: error: "), err
    return lines[0]


@pytest.fixture
def no_export(monkeypatch):
    """Any export that gets past the checks is recorded, not run."""
    import cg4ctr_fast.export.onnx_export as onnx_export

    requests = []
    monkeypatch.setattr(onnx_export, "export_onnx", lambda req: requests.append(req))
    return requests


@pytest.mark.parametrize("args,needle", [
    (["--lora-scale", "nan"], "--lora-scale needs --lora"),
    (["--lora-scale", "0.5"], "--lora-scale needs --lora"),
    (["--components", ""], "--components is empty"),
    (["--components", " , "], "--components is empty"),
    (["--batch", "1:1:100000000"], f"at most {MAX_CREATIVES}"),
    (["--batch", f"1:1:{MAX_CREATIVES + 1}"], f"at most {MAX_CREATIVES}"),
    (["--batch", "100000000"], f"at most {MAX_CREATIVES}"),
    (["--preset", "toy", "--random-weights"], "--random-weights do not apply"),
    (["--preset", "toy", "--model", "somewhere"], "--model do not apply"),
])
def test_onnx_refuses_before_any_work(tmp_path, capsys, no_export, args, needle):
    out = tmp_path / "out"
    line = _one_error_line(capsys, _export("onnx", "--out", str(out), *args))
    assert needle in line
    assert no_export == [] and not out.exists()


@pytest.mark.parametrize("scale", ["nan", "inf", "-inf"])
def test_lora_scale_must_be_finite(tmp_path, capsys, no_export, scale):
    lora = tmp_path / "l.safetensors"
    lora.write_bytes(b"")  # never read: the scale is refused first
    line = _one_error_line(capsys, _export("onnx", "--out", str(tmp_path / "o"), "--lora", str(lora),
                                           f"--lora-scale={scale}"))
    assert "--lora-scale must be a finite number" in line
    code = _export("refit", "--engines", str(tmp_path), "--lora", str(lora), f"--lora-scale={scale}")
    assert "--lora-scale must be a finite number" in _one_error_line(capsys, code)


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf])
def test_check_scale_refuses_non_finite(scale):
    from cg4ctr_fast.export.lora import check_scale

    with pytest.raises(InputError, match="finite"):
        check_scale(scale)
    assert check_scale(0) == 0.0 and check_scale(-1.5) == -1.5


def test_batch_at_the_limit_and_default_scale_pass(tmp_path, no_export):
    assert _export("onnx", "--out", str(tmp_path / "o"), "--batch", f"1:1:{MAX_CREATIVES}") == 0
    assert no_export[0].batch == (1, 1, MAX_CREATIVES) and no_export[0].lora_scale == 1.0
    assert no_export[0].components is None  # no --components: the default set


@pytest.mark.parametrize("command", [["engine", "--engines", "{tmp}", "--out", "{tmp}/trt"],
                                     ["refit", "--engines", "{tmp}", "--lora", "{tmp}/l.safetensors"]])
def test_tensorrt_unavailable_has_the_error_prefix(tmp_path, capsys, monkeypatch, command):
    import cg4ctr_fast.export.tensorrt_build as trt

    def unavailable(*a, **k):
        raise trt.TensorRTUnavailable("TensorRT needs an NVIDIA GPU and the tensorrt package; test")

    # Whether or not this machine has TensorRT, the message goes through the one error convention.
    monkeypatch.setattr(trt, "build_engines", unavailable)
    monkeypatch.setattr(trt, "refit_engines", unavailable)
    line = _one_error_line(capsys, _export(*[c.replace("{tmp}", str(tmp_path)) for c in command]))
    assert line.startswith("cg4ctr-export: error: TensorRT needs an NVIDIA GPU")


def test_preset_toy_exports_the_trained_generator(tmp_path, monkeypatch, no_export):
    import cg4ctr_fast.cli.main as cli_main

    generator, saliency = tmp_path / "generator", tmp_path / "saliency"
    monkeypatch.setattr(cli_main, "_toy_folders", lambda: (generator, saliency))
    assert _export("onnx", "--preset", "toy", "--out", str(tmp_path / "o")) == 0
    req = no_export[0]
    # The toy generator is the tiny stack, trained: its folder is the model, its saliency net comes with it.
    assert (req.preset, req.model, req.saliency, req.random_weights) == ("tiny", str(generator), str(saliency), False)
    assert _export("onnx", "--preset", "toy", "--saliency", "mine.pth", "--out", str(tmp_path / "p")) == 0
    assert no_export[1].saliency == "mine.pth"


def test_preset_toy_untrained_says_how(tmp_path, monkeypatch, capsys, no_export):
    import cg4ctr_fast.training.toy as toy

    monkeypatch.setattr(toy, "toy_root", lambda config: tmp_path / "toy")
    monkeypatch.setenv("CG4CTR_TOY_SET", str(tmp_path / "no-set"))  # as if the package shipped no toy set
    line = _one_error_line(capsys, _export("onnx", "--preset", "toy", "--out", str(tmp_path / "o")))
    assert "cg4ctr demo" in line and str(tmp_path / "toy") in line and no_export == []
