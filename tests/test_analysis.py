"""Failure selection and the evaluation pictures written at test time."""

import torch
from PIL import Image

from utils.analysis import failed_queries, save_failure_gallery, save_similarity_histogram


def _case():
    # Query 0 and 2 rank a wrong person first; query 1 is right.
    sim = torch.tensor([[0.1, 0.9, 0.2], [0.8, 0.1, 0.3], [0.2, 0.3, 0.4]])
    return sim, torch.tensor([0, 0, 1]), torch.tensor([0, 1, 2])


def test_failed_queries_are_those_whose_top_image_is_another_person():
    sim, text_pids, image_pids = _case()
    assert failed_queries(sim, text_pids, image_pids, count=10).tolist() == [0, 2]
    assert len(failed_queries(sim, text_pids, image_pids, count=1)) == 1
    assert failed_queries(sim, text_pids, image_pids, count=1).tolist() == (
        failed_queries(sim, text_pids, image_pids, count=1).tolist()
    )  # seeded


def test_failure_gallery_and_histogram_are_written(tmp_path):
    sim, text_pids, image_pids = _case()
    opened = []

    def load(index):
        opened.append(index)
        return Image.new("RGB", (32, 64), (index * 80, 0, 0))

    path = save_failure_gallery(sim, text_pids, image_pids, ["a", "b", "c"], load, tmp_path / "f.png", top_k=3)
    with Image.open(path) as image:
        assert image.size[0] > 3 * 48 and image.size[1] > 2 * 96
    assert set(opened) <= {0, 1, 2}  # only the drawn gallery images are read
    histogram = save_similarity_histogram(sim, text_pids, image_pids, tmp_path / "h.png")
    with Image.open(histogram) as image:
        assert image.format == "PNG" and image.size[0] > 100


def test_no_failures_still_gives_a_picture(tmp_path):
    sim = torch.eye(3)
    path = save_failure_gallery(
        sim, torch.arange(3), torch.arange(3), ["a", "b", "c"], lambda i: None, tmp_path / "none.png"
    )
    with Image.open(path) as image:
        assert image.size[0] > 0
