"""The pseudo-label filter's threshold chosen on validation. ``choose_on: validation`` in a round's config chooses
``min_mean_prob`` instead of taking it from the config: the teacher also predicts the fully labelled (not partially
labelled) validation cases of ``validation_fold`` (the source's splits_final.json, else ``num_folds`` /
``split_seed`` splits: the teacher's fold, which it did not train on); a component of those counts as true when it
overlaps a reference lesion, and the loosest threshold whose kept components reach ``precision_target`` (0.95) with
at least ``min_validation_components`` (5) kept is used (``pseudo_filter.choose_min_mean_prob``); otherwise the
config's ``min_mean_prob`` stays. The choice (and the precision table it was read from) is in
pseudo_label_report.json ``threshold_choice``; round.yaml keeps the config, so a rerun chooses again, identically."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from .io import Geometry, read_image
from .preprocessing import preprocess_image
from .pseudo_filter import score_components
from .pseudo_source import PseudoLabelError, Source, read_mask
from .pseudo_teacher import teacher_passes
from .raw_dataset import select_fold

if TYPE_CHECKING:
    from .predictor import Predictor


def validation_components(predictor: Predictor, config, source: Source,  # config: pseudo_label.RoundConfig
                          log: Callable[[str], None] = print) -> list:
    """The teacher's components on the fully labelled validation cases of ``config.validation_fold`` (scored with
    the round's passes), each with whether it overlaps a reference lesion."""
    try:
        _, val = select_fold(source.dataset, source.labelled, config.validation_fold, config.num_folds, config.split_seed)
    except ValueError as err:
        raise PseudoLabelError(f"choose_on validation: {err}") from err
    cases = [c for c in val if c.case_id not in source.partially_labelled]
    log(f"choosing min_mean_prob on {len(cases)} fully labelled validation case(s) of fold {config.validation_fold}")
    found = []
    for case in cases:
        try:
            found += _case_components(predictor, config, source, case)
        except PseudoLabelError:
            raise
        except (ValueError, OSError, RuntimeError) as err:  # named as run_round names a labelled case's error
            raise PseudoLabelError(f"choose_on validation: validation case {case.case_id} ({case.image}): "
                                   f"{err}") from err
    return found


def _case_components(predictor: Predictor, config, source: Source, case) -> list:
    image = read_image(case.image)
    geometry = Geometry.of(image)
    allowed = {0, source.tumour} | ({source.ignore_label} if source.ignore_label is not None else set())
    reference = read_mask(case.label, geometry, allowed, "label") == source.tumour
    tensor = torch.from_numpy(preprocess_image(image, predictor.plan))[None]
    with torch.inference_mode():
        teacher = teacher_passes(predictor, tensor, geometry.spacing, geometry.size, tta=config.tta)
    components, scores = score_components(teacher.mask, teacher.probability, geometry.spacing, config.thresholds,
                                          plain=teacher.plain_mask)
    return [(score, bool(reference[components == score.index].any())) for score in scores]
