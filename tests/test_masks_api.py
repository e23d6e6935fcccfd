"""``POST /monkey/v1/masks``: masks from kept maps for given mask settings, and a clear 404."""

from __future__ import annotations

import base64
import io
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image
from webui_run import generate, make_p

from monkey.args import MAPS_LABEL, MonkeyArgs, MonkeyArgsError
from monkey.kept import STORE
from monkey.webui import api

ON = MonkeyArgs(enabled=True, preview=True)
SIZE = {"width": 64, "height": 64}


def decode(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))


def map_id(processed, index: int = 0) -> str:
    return processed.infotexts[index].split(f"{MAPS_LABEL}: ", 1)[1].split(",")[0]


def test_the_masks_of_a_kept_id_are_the_ones_a_generation_with_those_settings_shows(webui):
    first = generate(webui, make_p(webui, ON, batch_size=2, **SIZE))
    tuned = generate(webui, make_p(webui, replace(ON, threshold=0.3), batch_size=2, **SIZE))
    response = api.masks_for({"id": map_id(first), "settings": {"threshold": 0.3}})
    assert response["size"] == [64, 64]
    assert [entry["index"] for entry in response["images"]] == [0, 1]
    for image, entry in enumerate(response["images"]):
        shown = np.asarray(tuned.images[2 + image])  # the mask previews follow the images
        assert np.array_equal(decode(entry["mask"]), shown)
        assert "threshold 0.30" in entry["status"]
    default = api.masks_for({"id": map_id(first)})  # no settings: the ones pass 1 ran with
    assert np.array_equal(decode(default["images"][0]["mask"]), np.asarray(first.images[2]))


def test_per_unit_maps_give_one_mask_per_unit(webui):
    settings = MonkeyArgs(enabled=True, mask_mode="per_unit")
    processed = generate(webui, make_p(webui, settings, units=[{"seed": 7}, {"seed": 11}], **SIZE))
    entry = api.masks_for({"id": map_id(processed), "settings": {"dilate": 8}})["images"][0]
    assert len(entry["units"]) == 2 and entry["status"].startswith("unit 0:")


def test_a_gone_id_is_a_clear_not_found(webui):
    with pytest.raises(api.MapsGoneError, match=r"not kept.*generate again"):
        api.masks_for({"id": "0123456789abcdef"})
    processed = generate(webui, make_p(webui, ON, **SIZE))
    STORE.clear()  # evicted, or the server restarted
    with pytest.raises(api.MapsGoneError):
        api.masks_for({"id": map_id(processed)})


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"id": 5}, "id"),
        ({"id": "x", "settings": [1]}, "settings"),
        ({"id": "x", "settings": {"token": 2}}, "token"),
        ({"id": "x", "settings": {"nonsense": 2}}, "nonsense"),
    ],
    ids=["id-not-a-string", "settings-not-an-object", "record-setting", "unknown-setting"],
)
def test_bad_requests_name_the_field(webui, body, field):
    generate(webui, make_p(webui, ON, **SIZE))
    body = {**body}
    if body.get("id") == "x":
        body["id"] = STORE.latest().id
    with pytest.raises(MonkeyArgsError) as caught:
        api.masks_for(body)
    assert caught.value.field == field


def test_the_route_answers_404_and_422_not_500(webui):
    fastapi = pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    app = fastapi.FastAPI()
    webui.modules["modules.script_callbacks"].fire("app_started", None, app)
    client = TestClient(app)
    gone = client.post(api.ROUTE, json={"id": "0123456789abcdef"})
    assert gone.status_code == 404 and "not kept" in gone.json()["detail"]
    processed = generate(webui, make_p(webui, ON, **SIZE))
    ok = client.post(api.ROUTE, json={"id": map_id(processed), "settings": {"threshold": 0.2}})
    assert ok.status_code == 200 and ok.json()["images"][0]["mask"]
    bad = client.post(api.ROUTE, json={"id": map_id(processed), "settings": {"dilate": -1}})
    assert bad.status_code == 422 and "dilate" in bad.json()["detail"]
