"""W&B panels of real cases (lightning_flare.case_panels): the slice, the composite, and the panels in an offline
W&B run's records at validation and test."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import tiny_cli_args
from wandb_records import history_keys, read_finished_run

import cli
from lightning_flare.case_panels import GAP, GREEN, GREY, RED, YELLOW, CasePanelLogger, caption, centre_slice, composite


def test_centre_slice_is_the_reference_centre_of_mass_else_the_prediction():
    reference, prediction = np.zeros((4, 4, 8), np.uint8), np.zeros((4, 4, 8), np.uint8)
    assert centre_slice(reference, prediction) == 4  # both empty: the middle slice
    prediction[0, 0, 6] = 1
    assert centre_slice(reference, prediction) == 6  # no reference: the predicted tumour
    reference[0, 0:2, 1] = 1  # two voxels at z = 1, one at z = 4: (1 + 1 + 4) / 3 = 2
    reference[3, 3, 4] = 1
    assert centre_slice(reference, prediction) == 2


def test_composite_shows_ct_reference_and_prediction_against_reference():
    hu = np.full((3, 2), -1000.0)  # (x, y)
    hu[0, 0] = 240.0  # the top of the default window (40 +/- 200 HU): white
    reference, prediction = np.zeros((3, 2), np.uint8), np.zeros((3, 2), np.uint8)
    reference[1, 0] = reference[2, 1] = 1
    prediction[1, 0] = prediction[0, 1] = 1
    out = composite(hu, reference, prediction)
    assert out.shape == (2, 3 * 3 + 2 * GAP, 3) and out.dtype == np.uint8  # rows = y, columns = x
    ct, ref, pred = out[:, 0:3], out[:, 3 + GAP:6 + GAP], out[:, 6 + 2 * GAP:]
    assert ct[0, 0].tolist() == [255, 255, 255] and ct[1, 2].tolist() == [0, 0, 0]
    half = lambda colour: [round(0.5 * c) for c in colour]  # noqa: E731 - blended into black air at alpha 0.5
    assert ref[0, 1].tolist() == half(GREEN) and ref[1, 2].tolist() == half(GREEN) and ref[1, 0].tolist() == [0, 0, 0]
    assert pred[0, 1].tolist() == half(YELLOW)  # both
    assert pred[1, 0].tolist() == half(RED)  # predicted only
    assert pred[1, 2].tolist() == half(GREEN)  # missed
    assert pred[0, 2].tolist() == [0, 0, 0]


def test_ignore_label_is_grey_not_tumour_and_left_out_of_slice_and_volumes():
    hu = np.full((4, 3, 6), -1000.0)
    reference, prediction = np.zeros((4, 3, 6), np.uint8), np.zeros((4, 3, 6), np.uint8)
    reference[0, 0, 1] = 1
    reference[1:4, :, 4:6] = 2  # nnU-Net's ignore label of a two-class plan: 18 voxels, unknown
    prediction[0, 0, 1] = prediction[3, 2, 5] = 1  # the second inside the unknown region
    panel = CasePanelLogger(num_cases=1)
    panel._add(hu, reference, prediction, "STS_1", (10.0, 10.0, 10.0), ignore_label=2)
    picture, text = panel._panels[0]
    assert text.startswith("STS_1 z=1: reference 1.0 ml, predicted 1.0 ml (x1.00)")  # z: the tumour, not the K block
    out = composite(hu[:, :, 5], reference[:, :, 5], prediction[:, :, 5], ignored=reference[:, :, 5] == 2)
    ref, pred = out[:, 4 + GAP:8 + GAP], out[:, 8 + 2 * GAP:]
    half = [round(0.5 * c) for c in GREY]
    assert ref[2, 3].tolist() == pred[2, 3].tolist() == half  # grey: neither reference nor a false positive
    assert ref[0, 0].tolist() == pred[0, 0].tolist() == [0, 0, 0]


def test_panels_of_one_call_have_one_size():
    class Recorder:
        def log_image(self, key, images, caption, step):
            self.images = images

    panel, recorder = CasePanelLogger(num_cases=3), Recorder()
    for shape in [(5, 3, 2), (2, 7, 2), (4, 4, 2)]:
        panel._add(np.zeros(shape), np.zeros(shape, np.uint8), np.ones(shape, np.uint8), "case", (1.0, 1.0, 1.0))
    panel._log(SimpleNamespace(is_global_zero=True, loggers=[recorder], global_step=0), "val/panels")
    assert {image.shape for image in recorder.images} == {(7, 3 * 5 + 2 * GAP, 3)}
    assert recorder.images[0][3:].max() == 0 and recorder.images[0][:3].max() > 0  # padded below with black


def test_caption_gives_volumes_and_ratio():
    reference, prediction = np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8)
    reference[0, 0, 0:2] = 1
    prediction[0:2, 0:3, 0] = 1
    assert caption("STS_1", 0, reference, prediction, (10.0, 10.0, 10.0)) == \
        "STS_1 z=0: reference 2.0 ml, predicted 6.0 ml (x3.00) | CT | reference | prediction"


def test_settings_name_the_wrong_value():
    with pytest.raises(ValueError, match="num_cases must be an integer >= 0, got -1"):
        CasePanelLogger(num_cases=-1)
    with pytest.raises(ValueError, match="every_n_validations must be an integer >= 1, got 0"):
        CasePanelLogger(every_n_validations=0)


def _wandb(args, save_dir, name):
    logger = {"class_path": "lightning.pytorch.loggers.WandbLogger",
              "init_args": {"save_dir": str(save_dir), "offline": True, "project": "tests", "name": name}}
    args[args.index("--trainer.logger") + 1] = json.dumps(logger)
    return args


def test_panels_of_real_cases_in_the_offline_wandb_run(tiny_dataset, tmp_path):
    """fit (2 epochs, whole-volume validation each; every_n_validations 2: panels at the second only) and test,
    each with an offline W&B logger: the panels are in the runs' records and media, one per case up to
    num_cases; validation also logs the postprocessing choice and the volume ratios."""
    from PIL import Image

    args = tiny_cli_args(tiny_dataset, tmp_path / "cache", tmp_path / "out")
    panels = {"class_path": "lightning_flare.case_panels.CasePanelLogger",
              "init_args": {"num_cases": 1, "every_n_validations": 2}}
    callbacks = json.loads(args[args.index("--trainer.callbacks") + 1]) + [panels]
    args[args.index("--trainer.callbacks") + 1] = json.dumps(callbacks)
    fit = cli.main(["fit", *_wandb(list(args), tmp_path / "wb_fit", "fit"), "--trainer.max_epochs", "3",
                    "--trainer.check_val_every_n_epoch", "1", "--trainer.log_every_n_steps", "1"])
    fit.trainer.logger.experiment.finish()
    run = next((tmp_path / "wb_fit" / "wandb").glob("offline-run-*"))
    media = sorted((run / "files" / "media" / "images" / "val").glob("panels_*.png"))
    assert len(media) == 2  # validations 2 (every second) and 3 (the last epoch), one case each
    history = history_keys(read_finished_run(run))
    for key in ("val/panels/count", "val/pp_largest_component", "val/volume_ratio_median", "val/volumes/_type"):
        assert key in history, key
    width, height = Image.open(media[0]).size  # validation panels: the plan's grid (a cached case)
    grids = {np.load(p, mmap_mode="r").shape[:2] for p in (tmp_path / "cache").rglob("*_label.npy")}
    assert ((width - 2 * GAP) // 3, height) in grids and (width - 2 * GAP) % 3 == 0

    result = cli.main(["test", *_wandb(list(args), tmp_path / "wb_test", "test"),
                       "--ckpt_path", str(tmp_path / "out" / "ckpt" / "last.ckpt")])
    result.trainer.logger.experiment.finish()
    run = next((tmp_path / "wb_test" / "wandb").glob("offline-run-*"))
    media = sorted((run / "files" / "media" / "images" / "test").glob("panels_*.png"))
    assert len(media) == 1 and "test/panels/count" in history_keys(read_finished_run(run))
    first = sorted((tiny_dataset / "imagesTs").glob("*.nii.gz"))[0]
    x, y, _ = sitk.ReadImage(str(first)).GetSize()  # test panels: the original grid
    assert Image.open(media[0]).size == (3 * x + 2 * GAP, y)
