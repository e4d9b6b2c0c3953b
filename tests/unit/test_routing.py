"""Routing, placement, bans and records: pure decisions, driven with hand-built swarms."""

from __future__ import annotations

import pytest

from mesh.bans import BanList
from mesh.placement import choose_range, layer_coverage
from mesh.records import DonorRecord, ModelInfo, model_id_for
from mesh.routing import NoRouteError, find_chain, uncovered
from mesh.status import format_status


def donor(name: str, start: int, end: int, throughput: float = 100.0, free: int = 1000) -> DonorRecord:
    return DonorRecord(model="m", start=start, end=end, peer_id=name, address=f"10.0.0.1:{hash(name) % 60000}",
                       throughput=throughput, free_cache_tokens=free)


def route(records, start=0, end=8, **kwargs):
    return [(h.donor.peer_id, h.start, h.end) for h in find_chain("m", records, start, end, **kwargs)]


def test_fewer_hops_win_when_compute_is_equal():
    swarm = [donor("a", 0, 4), donor("b", 4, 8), donor("whole", 0, 8), donor("c", 0, 2), donor("d", 2, 8)]
    assert route(swarm) == [("whole", 0, 8)]


def test_a_slow_donor_is_avoided_when_a_hop_costs_less():
    swarm = [donor("slow", 0, 8, throughput=10), donor("a", 0, 4, throughput=1000), donor("b", 4, 8, throughput=1000)]
    assert route(swarm) == [("a", 0, 4), ("b", 4, 8)]


def test_measured_round_trips_matter():
    swarm = [donor("near", 0, 8), donor("far", 0, 8)]
    assert route(swarm, rtt={"near": 0.200, "far": 0.001}) == [("far", 0, 8)]


def test_overlapping_spans_are_used_partially():
    swarm = [donor("a", 0, 5), donor("b", 3, 8)]
    hops = route(swarm)
    assert len(hops) == 2 and hops[0][0] == "a" and hops[1] == ("b", hops[0][2], 8) and 3 <= hops[0][2] <= 5


def test_banned_and_full_donors_are_skipped():
    swarm = [donor("a", 0, 8), donor("b", 0, 8, free=10), donor("c", 0, 8, throughput=50)]
    assert route(swarm, banned={"a"}, min_free_tokens=100) == [("c", 0, 8)]


def test_missing_layers_are_named():
    with pytest.raises(NoRouteError) as err:
        route([donor("a", 0, 3), donor("b", 5, 7)])
    assert err.value.missing == [(3, 5), (7, 8)]
    assert "no donor serves layers 3:5, 7:8 of m" in str(err.value)
    assert "--layers 3:5" in str(err.value) and "--layers 7:8" in str(err.value)


def test_layers_lost_only_to_bans_say_so():
    with pytest.raises(NoRouteError, match="other donors are full or temporarily banned"):
        route([donor("a", 0, 8)], banned={"a"})


def test_sub_range_routes():
    assert route([donor("a", 0, 8)], start=2, end=5) == [("a", 2, 5)]
    assert uncovered([donor("a", 2, 4)], 0, 6) == [(0, 2), (4, 6)]


def test_placement_fills_the_least_served_window():
    swarm = [donor("a", 0, 4), donor("b", 0, 4), donor("c", 4, 6)]
    assert layer_coverage(swarm, 8)[0] == [2, 2, 2, 2, 1, 1, 0, 0]
    assert choose_range(8, 2, swarm) == (6, 8)
    assert choose_range(8, 4, swarm) == (4, 8)
    assert choose_range(8, 20, swarm) == (0, 8)
    assert choose_range(8, 3, []) == (0, 3)


def test_placement_breaks_replica_ties_by_throughput():
    swarm = [donor("fast", 0, 4, throughput=1000), donor("slow", 4, 8, throughput=10)]
    assert choose_range(8, 4, swarm) == (4, 8)


def test_bans_back_off_exponentially_up_to_a_cap():
    bans = BanList(base_seconds=1, max_seconds=5)
    assert [bans.ban("x", now=0) for _ in range(5)] == [1, 2, 4, 5, 5]
    assert bans.banned(now=4.9) == {"x"} and bans.banned(now=5.1) == set()
    bans.succeeded("x")
    assert bans.ban("x", now=10) == 1


def test_records_tolerate_unknown_fields_and_reject_broken_ones():
    good = donor("a", 0, 4).to_dict()
    future = {**good, "gpu_temperature": 61, "version": 7}  # a newer donor's record
    parsed = DonorRecord.from_dict(future)
    assert parsed is not None and parsed.version == 7 and parsed.span == (0, 4) and parsed.address == good["address"]
    assert DonorRecord.from_dict({**good, "start": "zero"}) is None
    assert DonorRecord.from_dict({**good, "start": 5, "end": 2}) is None
    assert DonorRecord.from_dict({k: v for k, v in good.items() if k != "address"}) is None
    assert DonorRecord.from_dict("not a dict") is None


def test_model_ids():
    assert model_id_for("Qwen/Qwen3-0.6B") == "Qwen/Qwen3-0.6B"
    assert model_id_for("/tmp/models/tiny-llama/") == "tiny-llama"
    assert model_id_for("./tiny") == "tiny"


def test_status_table_lists_ranges_and_gaps():
    text = format_status([ModelInfo("m", 8)], {"m": [donor("peer-aaaaaaaaaaaa", 0, 3), donor("peer-bbbbbbbbbbbb", 5, 8)]})
    assert "m: 8 layers, 2 donor(s), UNCOVERED layers 3:5" in text
    assert "\n  0:3 " in text and "\n  5:8 " in text
    assert format_status([], {}) == "no models are announced in this swarm"


def test_status_flags_two_models_under_one_name_and_shows_quantization():
    six = [DonorRecord("m", 0, 6, "p1", "10.0.0.1:1", config="aaaaaaaa1111", dtype="float16", quant="nf4")]
    eight = [DonorRecord("m", 2, 8, "p2", "10.0.0.1:2", config="bbbbbbbb2222")]
    text = format_status([ModelInfo("m", 8)], {"m": six + eight})
    assert "WARNING: 2 different models announce this name" in text
    assert "config aaaaaaaa: UNCOVERED layers 6:8; config bbbbbbbb: UNCOVERED layers 0:2" in text
    assert "float16 nf4" in text and "aaaaaaaa " in text
    assert "WARNING" not in format_status([ModelInfo("m", 8)], {"m": eight + [donor("old", 0, 2)]})


def test_a_note_added_to_a_routing_error_keeps_the_earlier_ones():
    err = NoRouteError("m", [(0, 2)]).with_note("first").with_note("second")
    assert str(err).endswith("--initial-peers ...`. first. second")
