"""`python -m sppo.driver` refuses bad input before any work: exit code 2, a message on stderr
that names the config field and the value, nothing written to the run directory and, for
problems that need no cluster, Ray not even started.

Bad values, local paths that do not exist, a pool asking for more CPUs or GPUs than the cluster
has. The driver as a whole (SIGKILLed, resumed) runs in test_journal.py.
"""

from __future__ import annotations

import pytest

import cluster.launch
from sppo.driver import main


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if the driver gets as far as connecting to Ray."""

    def connect_ray(cfg):
        raise AssertionError("the driver started Ray before refusing the config")

    monkeypatch.setattr(cluster.launch, "connect_ray", connect_ray)


# Local paths only: a hub id ("org/name") cannot be checked without the hub, and is reported
# where it is loaded.
MISSING_PATHS = [
    ("model.path", "/no/such/model", []),
    ("model.path", "./no/such/model", []),
    ("data.path", "/no/such/prompts.jsonl", []),
    ("judge.model_path", "/no/such/reward-model", ["judge.backend=reward_model"]),
]


@pytest.mark.parametrize("field,value,extra", MISSING_PATHS,
                         ids=[f"{f}={v}" for f, v, _ in MISSING_PATHS])
def test_missing_local_path_is_refused_before_ray(tmp_path, capsys, no_ray, field, value, extra):
    code = main([f"run.output_dir={tmp_path}", f"{field}={value}", *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert field in err and value in err and "does not exist" in err
    assert not any(tmp_path.iterdir())  # no run directory, no config.yaml


def test_existing_paths_and_hub_ids_pass_the_path_check(tmp_path, capsys, no_ray):
    """A hub id or a `builtin:` name is not a local path; the check must not refuse it (here
    the driver goes on to start Ray, which the fixture turns into the AssertionError)."""
    with pytest.raises(AssertionError, match="started Ray"):
        main([f"run.output_dir={tmp_path}", "model.path=someone/some-model"])
    with pytest.raises(AssertionError, match="started Ray"):
        main([f"run.output_dir={tmp_path}", "model.path=builtin:tiny-llama"])


def test_pool_asking_for_more_cpus_than_the_cluster_is_refused(ray_cluster, tmp_path, capsys):
    """4 generators x 8 CPUs on the session's 16-CPU cluster: refused, naming the pool and
    both amounts, before any actor starts."""
    code = main([f"run.output_dir={tmp_path}", "pools.generator.replicas=4",
                 "pools.generator.max_replicas=4", "pools.generator.num_cpus=8"])
    err = capsys.readouterr().err
    assert code == 2
    assert "pools.generator" in err and "32" in err and "16" in err
    assert not any(tmp_path.iterdir())


def test_bad_config_stops_before_any_work(tmp_path, capsys):
    assert main([f"run.output_dir={tmp_path}", "sampling.k=1", "trainer.eta=0"]) == 2
    err = capsys.readouterr().err
    assert "sampling.k" in err and "trainer.eta" in err
    assert not any(tmp_path.iterdir())


def test_pool_larger_than_the_cluster_is_refused(ray_cluster, tmp_path, capsys):
    assert main([f"run.output_dir={tmp_path}", "pools.generator.num_gpus=1"]) == 2
    assert "pools.generator" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_a_relative_output_dir_in_a_ray_job_working_dir_is_named(tmp_path, caplog):
    """Under `ray job submit --working-dir`, the driver runs in Ray's unpacked copy of the
    working directory: a relative run.output_dir lands there. One node: a warning naming where
    the files go; several nodes: refused, naming the field (the others cannot see it). An
    absolute output_dir, or a driver outside such a copy, passes silently."""
    from cluster.launch import check_output_dir, in_ray_job_working_dir
    from sppo.config import load_config
    from sppo.driver import DEMO_CONFIG

    pkg = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_ab12"
    pkg.mkdir(parents=True)
    assert in_ray_job_working_dir(pkg) and not in_ray_job_working_dir(tmp_path)
    relative = load_config(DEMO_CONFIG, ["run.output_dir=runs"])
    one, two = [{"Alive": True}], [{"Alive": True}, {"Alive": True}]
    with caplog.at_level("WARNING", logger="sppo.driver"):
        assert check_output_dir(relative, one, cwd=pkg) == []
    assert f"go to {pkg / 'runs'}" in caplog.text
    (problem,) = check_output_dir(relative, two, cwd=pkg)
    assert problem.startswith("run.output_dir 'runs' is relative") and "/mnt/shared" in problem
    absolute = load_config(DEMO_CONFIG, [f"run.output_dir={tmp_path / 'runs'}"])
    assert check_output_dir(absolute, two, cwd=pkg) == []
    assert check_output_dir(relative, two, cwd=tmp_path) == []
