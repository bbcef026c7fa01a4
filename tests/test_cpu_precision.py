"""bf16 or fp32 on the CPU: chosen by timing, remembered per CPU model."""
import json

import pytest

import lightning_flare.cpu_precision as cpu_precision
from lightning_flare.cpu_precision import choose_bf16, cpu_bf16_is_faster, decision_key


def _timer(seconds, calls):
    values = iter(seconds)

    def run():
        calls.append(1)
        return next(values)

    return run


def test_bf16_chosen_only_when_clearly_faster():
    fp32 = [9, 1.0, 1.0, 1.1, 1.0]  # warm-up, then runs interleaved with bf16's
    assert choose_bf16(_timer(fp32, []), _timer([2.0, 0.6, 0.7, 0.65], []), repeats=3)[0] is True
    assert choose_bf16(_timer(fp32, []), _timer([2.0, 0.95, 0.92, 0.99], []), repeats=3)[0] is False  # within the margin
    assert choose_bf16(_timer(fp32, []), _timer([2.5, 1.3, 1.4, 1.2], []), repeats=3)[0] is False


def test_a_spike_of_other_work_does_not_decide():
    """The best run of each counts: one slow fp32 run (another job) does not make bf16 look faster."""
    faster, timings = choose_bf16(_timer([9, 1.0, 5.0, 1.0, 1.0], []), _timer([1.5, 0.98, 0.97, 0.99], []), repeats=3)
    assert faster is False and timings["fp32_s"] == 1.0


def test_emulated_bf16_is_abandoned_after_one_run():
    bf16_calls = []
    faster, timings = choose_bf16(_timer([9, 1.0], []), _timer([50.0], bf16_calls))
    assert faster is False and len(bf16_calls) == 1 and timings["bf16_first_s"] == 50.0


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("LIGHTNING_FLARE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_precision, "_decided", {})
    return tmp_path / "cache" / "cpu_precision.json"


def test_measured_once_then_read_from_the_cache_file(monkeypatch, fresh):
    measured = []
    monkeypatch.setattr(cpu_precision, "choose_bf16", lambda *a: measured.append(1) or (False, {"fp32_s": 0.01, "bf16_s": 0.02}))
    assert cpu_bf16_is_faster() is False
    stored = json.loads(fresh.read_text())
    assert stored[decision_key()] == {"bf16_faster": False, "fp32_s": 0.01, "bf16_s": 0.02}
    monkeypatch.setattr(cpu_precision, "_decided", {})  # a new process
    assert cpu_bf16_is_faster() is False and len(measured) == 1


def test_another_instruction_set_is_measured_again(monkeypatch, fresh):
    answers = iter([(True, {}), (False, {})])
    monkeypatch.setattr(cpu_precision, "choose_bf16", lambda *a: next(answers))
    assert cpu_bf16_is_faster() is True
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert cpu_bf16_is_faster() is False
    assert len(json.loads(fresh.read_text())) == 2


def test_unwritable_cache_is_not_an_error(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("LIGHTNING_FLARE_CACHE", str(blocker / "sub"))  # a folder below a file cannot exist
    monkeypatch.setattr(cpu_precision, "_decided", {})
    monkeypatch.setattr(cpu_precision, "choose_bf16", lambda *a: (True, {}))
    assert cpu_bf16_is_faster() is True


def test_the_real_probe_runs_and_decides():
    """On whatever CPU runs the tests: the probe finishes and returns a bool (which one depends on the CPU)."""
    faster, timings = choose_bf16(cpu_precision._conv_timer(False), cpu_precision._conv_timer(True))
    assert isinstance(faster, bool) and timings["fp32_s"] > 0


@pytest.mark.parametrize("cap, native", [("AVX2", False), ("AVX512_CORE", False), ("SSE41", False)])
def test_capped_instruction_sets_without_bf16_are_not_timed(monkeypatch, fresh, cap, native):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    monkeypatch.setattr(cpu_precision.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu_precision, "choose_bf16", lambda *a: pytest.fail("emulated bf16 must not be timed"))
    assert cpu_precision.native_bf16() is native
    assert cpu_bf16_is_faster() is False
