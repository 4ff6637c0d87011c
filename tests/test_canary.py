"""The canary's routing (deploy/canary.py): shares as the registry states them, keys' sides, and what a canary
cannot take."""
import asyncio
import dataclasses

import numpy as np
import pytest

from deploy.canary import BUCKETS, CanaryRoute, ShareError, bucket, parse_share
from deploy.server import ModelServer, ServerSettings
from deploy.v2 import parse_json_infer
from deploy.source import FileSource


@pytest.mark.parametrize("value, share", [(None, 0.0), ("", 0.0), ("0", 0.0), ("12.5", 12.5), ("100", 100.0), (25, 25.0)])
def test_a_share_is_a_percent_and_no_tag_is_none(value, share):
    assert parse_share(value) == share


@pytest.mark.parametrize("value", ["-1", "100.5", "ten", "nan", "inf"])
def test_a_share_that_is_not_a_percent_is_refused_naming_the_fix(value):
    with pytest.raises(ShareError, match=r"is not a percent from 0 to 100: set it with `graft canary set PERCENT`"):
        parse_share(value)


def test_a_ramp_moves_no_key_back_and_each_share_takes_its_part_of_the_keys():
    keys = [f"user-{i}" for i in range(20_000)]
    assert all(0 <= bucket(key) < BUCKETS for key in keys[:100]) and bucket("user-1") == bucket("user-1")
    taken = {share: {key for key in keys if CanaryRoute("v2", share).takes(key)} for share in (0, 5, 25, 100)}
    assert taken[0] == set() and taken[100] == set(keys)
    assert taken[5] < taken[25]  # a key on the canary at 5% stays on it at 25%
    for share in (5, 25):  # uniform: within 4.5 binomial standard deviations of the share
        expected = len(keys) * share / 100
        assert abs(len(taken[share]) - expected) < 4.5 * (expected * (1 - share / 100)) ** 0.5


def test_a_tensor_the_canary_cannot_take_is_answered_by_the_champion(candidate_template):
    """A canary whose contract takes another input shape (a new architecture's input size) must not turn the
    champion-shaped tensors routed to it into errors: the champion answers them."""
    async def scenario() -> tuple[str, list[int]]:
        server = ModelServer(FileSource(candidate_template[0] / "models" / "model.onnx"), ServerSettings())
        await server.switch_to("file")
        champion = server.served
        contract = dataclasses.replace(champion.model.contract, height=7, width=7)
        canary_model = dataclasses.replace(champion.model, contract=contract)
        server.canary = CanaryRoute(dataclasses.replace(champion, version="canary", route="canary", model=canary_model),
                                    100.0)
        rows = np.zeros((1, *champion.model.contract.shape), np.float32)
        body = {"inputs": [{"name": champion.model.contract.input_name, "shape": list(rows.shape),
                            "datatype": "FP32", "data": rows.ravel().tolist()}]}
        inferred = await server.infer(lambda served: parse_json_infer(body, served.model, 8), "any key", inline=True)
        await champion.batcher.stop()
        return inferred.served.route, list(inferred.logits.shape)

    route, shape = asyncio.run(scenario())
    assert route == "champion" and shape[0] == 1
