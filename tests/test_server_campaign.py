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
