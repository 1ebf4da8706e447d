"""The kill -9 and tenant campaign of ``bench/server_campaign.py`` in the test run: a bounded pass
(two tenants; two kill scenarios) here, every scenario over two rounds under the ``slow`` marker.
The figures of a full run are in docs/server.md, "Campaign"."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import server_campaign as campaign  # noqa: E402


def test_tenants_train_as_alone_and_every_cross_tenant_probe_is_refused(tiny_model_dir, tmp_path):
    result = campaign.tenant_campaign(tiny_model_dir, tmp_path / "data", 2, 2)
    assert result["errors"] == 0 and result["runs_differing_from_alone"] == 0
    assert result["probes"] > 0 and result["refused"] == result["probes"], result["leaks"]
    assert result["victims_intact"] == result["clients"] == 2


def test_the_load_probes_succeed_for_the_owner(tiny_model_dir, tmp_path):
    """The probes are real requests: the owner's own state loads through each of them (through
    the SDK's ``create_training_client_from_state*`` and a ``load_weights`` into an existing
    model, what the deprecated ``TrainingClient.load_state`` sent)."""
    (tmp_path / "data").mkdir()
    srv = campaign.Server(tiny_model_dir, tmp_path / "data", {"tml-owner": "owner"})
    srv.start()
    try:
        victim = campaign.tenant_work(srv.url, str(tiny_model_dir), "tml-owner", 1, 2)
        victim["base"] = str(tiny_model_dir)
        refused = dict(campaign.probes(srv.url, "tml-owner", victim))
    finally:
        srv.stop()
    loads = ("create_from_state", "create_from_state_with_optimizer", "load_state")
    assert [refused[name] for name in loads] == [False, False, False]


def kill_campaign(model: Path, data: Path, scenarios: tuple[str, ...], rounds: int) -> dict:
    kc = campaign.KillCampaign(
        campaign.Server(model, data, {"tml-alice": "alice"}), "tml-alice", 120, random.Random(0)
    )
    kc.SCENARIOS = scenarios
    try:
        count = kc.run(rounds)
    finally:
        kc.srv.stop()
    assert not kc.problems, kc.problems
    return count


def test_kill_9_during_a_save_and_an_optim_step_loses_nothing(tiny_model_dir, tmp_path):
    count = kill_campaign(tiny_model_dir, tmp_path / "data", ("during_save", "during_optim"), 1)
    assert count["scenarios"] == count["kills"] == 2 and count["acked"] > 0
    assert count["lost"] == count["hung"] == count["resume_failed"] == 0


@pytest.mark.slow
def test_kill_9_campaign_every_scenario(tiny_model_dir, tmp_path):
    count = kill_campaign(tiny_model_dir, tmp_path / "data", campaign.KillCampaign.SCENARIOS, 2)
    assert count["lost"] == count["hung"] == count["resume_failed"] == 0
