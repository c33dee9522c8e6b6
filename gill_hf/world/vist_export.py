"""`gill-hf world export-vist DIR`: world stories written as a VIST dataset, in VIST's published layout,
so that `gill-hf eval vist DIR` runs the paper's VIST protocol offline on GILL-tiny.

A story is 5 frames (`world.context.story_frames`): the first sentence introduces an object, each
next one changes one attribute of "it", and each frame's image shows the object as the sentences so
far leave it (backgrounds vary frame to frame, as photos do). The 5th sentence alone does not say what
the 5th image shows; the 5 sentences, or 4 sentences and images plus the 5th sentence, do. Phrasings
are the context_test ones (never seen in GILL-tiny's training).

Layout: `<split>.story-in-sequence.json` (VIST's SIS schema: `images`, `albums`, `annotations` of
storylets with `story_id`, `photo_flickr_id`, `worker_arranged_photo_order`, `text`,
`original_text`, ...) and `images/<split>/<photo_flickr_id>.png`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from .context import story_frames
from .render import BACKGROUND_NAMES, Scene, render_scene


def export_world_vist(folder: str | Path, num_stories: int = 200, split: str = "test", seed: int = 0) -> Path:
    folder = Path(folder)
    image_dir = folder / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    annotations, images, albums = [], [], []
    for story in range(num_stories):
        rng = random.Random(f"world-vist/{seed}/{split}/{story}")
        album_id = f"{seed}{story:06d}"
        albums.append({"id": album_id, "title": f"world story {story}", "description": "", "photos": "5"})
        for order, (sentence, obj) in enumerate(story_frames(rng, 5, pool="test")):
            photo_id = f"{seed}{story:06d}{order}"
            render_scene(Scene(rng.choice(BACKGROUND_NAMES), (obj,))).save(image_dir / f"{photo_id}.png")
            images.append({"id": photo_id, "album_id": album_id, "title": "", "tags": "", "url_o": "",
                           "datetaken": "", "text": ""})
            annotations.append([{
                "story_id": str(seed * 10**7 + story), "storylet_id": str((seed * 10**7 + story) * 5 + order),
                "album_id": album_id, "photo_flickr_id": photo_id, "worker_arranged_photo_order": order,
                "text": sentence.lower().replace(".", " ."), "original_text": sentence,
                "tier": "story-in-sequence", "setting": "world", "worker_id": "gill-hf-world",
            }])
    payload = {"info": {"description": "GILL-hf world stories in VIST's SIS layout"}, "type_": "story-in-sequence",
               "images": images, "albums": albums, "annotations": annotations}
    (folder / f"{split}.story-in-sequence.json").write_text(json.dumps(payload))
    return folder


__all__ = ["export_world_vist"]
