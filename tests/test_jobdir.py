"""The run directory's layout: checkpoints and published samplers as the original names them."""

import json

from trinity.jobdir import JobDir


def test_checkpoints_are_complete_only_once_the_marker_names_them(tmp_path):
    job = JobDir(tmp_path / "run")
    assert job.latest_checkpoint() is None and job.checkpointed_steps() == []
    job.write_checkpoint(2, "tinker://run/weights/s2")
    job.write_checkpoint(4, "tinker://run/weights/s4")
    assert job.latest_checkpoint() == (4, "tinker://run/weights/s4")
    assert job.checkpointed_steps() == [2, 4]
    assert (tmp_path / "run" / "global_step_4" / "remote_checkpoint_path.txt").exists()
    assert (tmp_path / "run" / "global_step_4" / ".full_checkpoint").exists()
    assert (tmp_path / "run" / "latest_checkpointed_iteration.txt").read_text() == "4"
    # a step whose state was written but whose marker was not (killed in between) is not resumed
    (job.step_dir(6)).mkdir()
    (job.step_dir(6) / "remote_checkpoint_path.txt").write_text("tinker://run/weights/s6")
    assert job.latest_checkpoint() == (4, "tinker://run/weights/s4")
    assert not list(job.path.glob("*.tmp"))


def test_published_samplers_make_no_step_directories(tmp_path):
    job = JobDir(tmp_path)
    assert job.latest_sampler() == (0, None)
    job.write_sampler(3, "tinker://run/sampler_weights/s3")
    assert job.latest_sampler() == (3, "tinker://run/sampler_weights/s3")
    job.write_sampler(5, None)  # the base model
    assert job.latest_sampler() == (5, None)
    assert not list(tmp_path.glob("global_step_*"))
    # the original's marker names only steps whose directory holds the sampler's path
    assert not (tmp_path / "latest_state_dict_iteration.txt").exists()


def test_the_original_s_sampler_marker_moves_at_saved_steps(tmp_path):
    """The original's trainer reads ``global_step_<latest_state_dict_iteration>/
    remote_sampler_path.txt`` when it resumes: that file exists whenever the marker does."""
    job = JobDir(tmp_path)
    job.write_sampler(2, "tinker://run/sampler_weights/s2")  # published, then saved (the loop)
    job.write_checkpoint(2, "tinker://run/weights/state-2")
    job.write_sampler(3, "tinker://run/sampler_weights/s3")  # not a saved step
    job.write_checkpoint(4, "tinker://run/weights/state-4")  # saved, then published
    job.write_sampler(4, "tinker://run/sampler_weights/s4")
    job.write_sampler(5, "tinker://run/sampler_weights/s5")
    assert sorted(p.name for p in tmp_path.glob("global_step_*")) == [
        "global_step_2",
        "global_step_4",
    ]
    marker = int((tmp_path / "latest_state_dict_iteration.txt").read_text())
    assert marker == 4
    sampler_file = tmp_path / f"global_step_{marker}" / "remote_sampler_path.txt"
    assert sampler_file.read_text() == "tinker://run/sampler_weights/s4"
    assert (tmp_path / "global_step_2" / "remote_sampler_path.txt").exists()


def test_a_run_directory_written_by_the_original_resumes(tmp_path):
    """The original's Tinker backend leaves exactly these files (and no weights) per checkpoint."""
    (tmp_path / "global_step_100").mkdir()
    (tmp_path / "global_step_100" / "remote_checkpoint_path.txt").write_text(
        "tinker://abc/weights/trinity-state-100\n"
    )
    (tmp_path / "global_step_100" / ".full_checkpoint").touch()
    (tmp_path / "global_step_100" / "remote_sampler_path.txt").write_text(
        "tinker://abc/sampler_weights/trinity-sampler-100\n"
    )
    (tmp_path / "global_step_101").mkdir()  # the original publishes into a directory each step
    (tmp_path / "global_step_101" / "remote_sampler_path.txt").write_text(
        "tinker://abc/sampler_weights/trinity-sampler-101\n"
    )
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("100")
    (tmp_path / "latest_state_dict_iteration.txt").write_text("101")
    job = JobDir(tmp_path)
    assert job.latest_checkpoint() == (100, "tinker://abc/weights/trinity-state-100")
    assert job.checkpointed_steps() == [100]
    assert job.latest_sampler() == (101, "tinker://abc/sampler_weights/trinity-sampler-101")


def test_taskset_position_is_recorded_only_where_steps_read_extra_batches(tmp_path):
    job = JobDir(tmp_path)
    job.record_taskset_position(1, 1)
    assert not job.taskset_position_file.exists()  # one batch a step: nothing to record
    job.record_taskset_position(2, 4)  # step 2 read three batches
    for step in (3, 4):
        job.record_taskset_position(step, step + 2)
    job.record_taskset_position(5, 9)
    assert json.loads(job.taskset_position_file.read_text()) == {"2": 4, "5": 9}
    assert [job.taskset_batches_read(s) for s in range(7)] == [0, 1, 4, 5, 6, 9, 10]
    job.record_taskset_position(3, 5)  # a resumed run explores step 3 again: later records go
    assert json.loads(job.taskset_position_file.read_text()) == {"2": 4}
