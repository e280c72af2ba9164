"""The warm site runner imports the image augmentation ahead of the tasks only where the site
has images: a record-only site (EHR tables) saves torchvision and torch._dynamo (~1.9 CPU-s)."""

from __future__ import annotations

import subprocess
import sys

from fedmed.client.cli import runner_command


def test_the_runner_is_told_whether_the_site_folder_holds_images(tmp_path):
    records_only, with_images = tmp_path / "records", tmp_path / "images"
    for d in (records_only, with_images):
        d.mkdir()
        (d / "records.csv").write_text("patient_id,label\n")
    (with_images / "images.csv").write_text("image,patient_id,label\n")
    assert runner_command(5555, records_only)[-1] == "--no-images"
    assert "--no-images" not in runner_command(5555, with_images)
    assert runner_command(5555, with_images)[1:] == ["-m", "fedmed.client.warm", "--runtime-api-address",
                                                     "127.0.0.1:5555"]


def test_preload_imports_torchvision_only_for_a_site_with_images():
    code = ("import sys\n"
            "from fedmed.client.warm import preload\n"
            "preload(images=False)\n"
            "print('fedmed.client.app' in sys.modules, 'torchvision' in sys.modules)\n"
            "preload(images=True)\n"
            "print('torchvision.transforms.v2' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False", "True"]
