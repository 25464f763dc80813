"""``/activelearning/random``: a study without the requested label, chosen at random, the ones handed out longest
ago (or never) more likely.

MONAI Label's own ``Random`` weights each study by the seconds since it was last handed out, so once every study
has been handed out within the current second all weights are zero and the request fails (500). Here each weight
is at least one second.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

logger = logging.getLogger(__name__)


class RandomUnlabeled(Strategy):
    def __init__(self):
        super().__init__("A study without the label, at random (those handed out longest ago more likely)")

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any] | None:
        images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        if not images:
            return None
        strategy = request["strategy"]
        now = int(time.time())
        last = [datastore.get_image_info(image).get("strategy", {}).get(strategy, {}).get("ts", 0) for image in images]
        weights = [max(1, now - int(ts or 0)) for ts in last]
        index = random.choices(range(len(images)), weights=weights)[0]
        logger.info("random: %s (weight %d of %d studies)", images[index], weights[index], len(images))
        return {"id": images[index], "weight": weights[index]}
