"""Thread-count rule (alignkit.ops.threads): never more busy threads than cores across a run's processes."""

import pytest
import torch

from alignkit.ops.threads import choose_threads


def test_omp_num_threads_is_respected():
    assert choose_threads({"OMP_NUM_THREADS": "3"}, cores=2) == (3, "OMP_NUM_THREADS=3")
    assert choose_threads({"ALIGNKIT_NUM_THREADS": "1", "OMP_NUM_THREADS": "4"}, cores=8)[0] == 1


def test_cores_are_shared_between_local_processes():
    assert choose_threads({}, cores=2)[0] == 2
    assert choose_threads({"LOCAL_WORLD_SIZE": "2"}, cores=2)[0] == 1
    assert choose_threads({"LOCAL_WORLD_SIZE": "3"}, cores=8)[0] == 2
    assert choose_threads({"LOCAL_WORLD_SIZE": "4"}, cores=2)[0] == 1  # never 0


@pytest.mark.parametrize("value", ["two", "0"])
def test_bad_thread_setting_is_an_error(value):
    with pytest.raises(ValueError, match="OMP_NUM_THREADS"):
        choose_threads({"OMP_NUM_THREADS": value}, cores=2)


def test_cli_reports_bad_thread_setting(tmp_path, monkeypatch, capsys):
    from alignkit.cli import main

    monkeypatch.setenv("ALIGNKIT_NUM_THREADS", "lots")
    assert main(["sft", "data.train=builtin:sft_demos", "model.name_or_path=tiny-random",
                 f"train.output_dir={tmp_path / 'run'}"]) == 2
    assert "ALIGNKIT_NUM_THREADS='lots' is not a whole number" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_configure_allocator_applies_on_glibc_unless_opted_out():
    """glibc: mallopt raises the mmap / trim thresholds (True); ALIGNKIT_MALLOC=default leaves glibc alone; the
    process keeps working (a large tensor is allocated, freed and allocated again)."""
    import platform

    from alignkit.ops.threads import configure_allocator

    assert configure_allocator({"ALIGNKIT_MALLOC": "default"}) is False
    applied = configure_allocator({})
    assert applied is (platform.libc_ver()[0] == "glibc")
    for _ in range(2):
        x = torch.ones(64, 49152)
        assert float(x.sum()) == 64 * 49152
        del x
