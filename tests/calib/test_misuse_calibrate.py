"""calibrate() misuse (issue 13 section 2): each case raises an FxQuantError naming the batch and the fix, or
gives the right ranges."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fxquant
from fxquant import QuantConfig, QuantSpec
from fxquant.errors import CalibrationDataError, CalibrationError, ConversionError, FxQuantError
from tests.models.tiny import ConvFC as _Net


def _data(n: int = 3, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 8, 8, generator=g) for _ in range(n)]


def _prepare(method: str = "max") -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxquant.prepare(_Net().eval(), _data(1)[0], config=QuantConfig(
            activation=QuantSpec(calib_method=method)))


def _scales(prepared: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.scale.clone() for n, m in prepared.named_modules() if isinstance(m, fxquant.TensorQuantizer)}


@pytest.mark.parametrize("method", ["max", "percentile"])
def test_a_batch_with_zero_samples_is_named(method):
    batches = [*_data(2), torch.empty(0, 3, 8, 8)]
    with pytest.raises(CalibrationDataError, match=r"calibration batch 2 has 0 samples \(float32\[0, 3, 8, 8\]\); "
                                                   r"drop empty batches"):
        fxquant.calibrate(_prepare(method), batches, progress=False)


def test_a_batch_of_another_shape_names_its_index_and_the_example():
    batches = [*_data(2), torch.randn(2, 3, 9, 9)]
    with pytest.raises(CalibrationDataError, match=r"failed on calibration batch 2 \(float32\[2, 3, 9, 9\]\) "
                                                   r"\(prepare's example was float32\[2, 3, 8, 8\]\).*shape and dtype"):
        fxquant.calibrate(_prepare(), batches, progress=False)


def test_a_batch_of_another_dtype_names_its_index_and_the_cast():
    batches = [*_data(2), _data(1)[0].double()]
    with pytest.raises(CalibrationDataError, match=r"batch 2 input 0 is float64\[2, 3, 8, 8\].*batch.to\(torch."
                                                   r"float32\)"):
        fxquant.calibrate(_prepare(), batches, progress=False)


@pytest.mark.parametrize(("batches", "match"), [(None, "batches=None"), (5, "got int"),
                                                ({"x": 1}, "got dict")])
def test_not_an_iterable_of_batches(batches, match):
    with pytest.raises(CalibrationError, match=match) as info:
        fxquant.calibrate(_prepare(), batches, progress=False)
    assert isinstance(info.value, TypeError)


def test_numpy_batches_give_the_ranges_of_the_same_tensors():
    reference = _scales(fxquant.calibrate(_prepare(), _data(), progress=False))
    got = _scales(fxquant.calibrate(_prepare(), [x.numpy() for x in _data()], progress=False))
    assert got.keys() == reference.keys()
    assert all(torch.equal(got[k], reference[k]) for k in reference)


def test_dict_batches_keyed_by_forward_names_and_inputs_key():
    reference = _scales(fxquant.calibrate(_prepare(), _data(), progress=False))
    by_name = _scales(fxquant.calibrate(_prepare(), [{"x": x, "label": 0} for x in _data()], progress=False))
    by_key = _scales(fxquant.calibrate(_prepare(), [{"image": x} for x in _data()], progress=False, inputs="image"))
    assert all(torch.equal(by_name[k], reference[k]) and torch.equal(by_key[k], reference[k]) for k in reference)
    with pytest.raises(CalibrationDataError, match=r"batch 0 is a dict with keys \['image'\].*\(x\); pass "
                                                   r"inputs='<key>'"):
        fxquant.calibrate(_prepare(), [{"image": x} for x in _data()], progress=False)


@pytest.mark.smoke
def test_tensordataset_pairs_are_answered_and_inputs_selects_them():
    xs = torch.cat(_data())
    loader = DataLoader(TensorDataset(xs, torch.arange(len(xs))), batch_size=2)
    with pytest.raises(CalibrationDataError, match=r"batch 0 holds 2 items \(float32\[2, 3, 8, 8\], int64\[2\]\) "
                                                   r"but the model's forward takes 1 input\(s\) \(x\).*inputs=0"):
        fxquant.calibrate(_prepare(), loader, progress=False)
    reference = _scales(fxquant.calibrate(_prepare(), _data(), progress=False))
    by_index = _scales(fxquant.calibrate(_prepare(), loader, progress=False, inputs=0))
    by_function = _scales(fxquant.calibrate(_prepare(), loader, progress=False, inputs=lambda b: b[0]))
    assert all(torch.equal(by_index[k], reference[k]) and torch.equal(by_function[k], reference[k])
               for k in reference)


def test_a_bad_inputs_selector_names_the_batch():
    with pytest.raises(CalibrationDataError, match=r"inputs=3 does not select from calibration batch 0 \(it holds "
                                                   r"2 items\)"):
        fxquant.calibrate(_prepare(), [(x, 0) for x in _data()], progress=False, inputs=3)
    with pytest.raises(CalibrationDataError, match=r"the inputs= function failed on calibration batch 0"):
        fxquant.calibrate(_prepare(), _data(), progress=False, inputs=lambda b: b.images)


def test_all_zero_calibration_data_raises():
    with pytest.raises(CalibrationDataError, match=r"every calibration batch is all zeros.*calibrate on real data"):
        fxquant.calibrate(_prepare(), [torch.zeros(2, 3, 8, 8)] * 2, progress=False)


def test_a_failed_recalibration_leaves_no_old_ranges_for_convert():
    prepared = fxquant.calibrate(_prepare(), _data(), progress=False)
    assert fxquant.convert(prepared) is not None
    bad = [*_data(), torch.full((2, 3, 8, 8), float("nan"))]
    with pytest.raises(CalibrationDataError, match="batch 3 contains NaN"):
        fxquant.calibrate(prepared, bad, progress=False)
    with pytest.raises(ConversionError, match=r"4 quantizer\(s\) have no range yet.*run fxquant.calibrate"):
        fxquant.convert(prepared)
    # calibrating again works and gives the first calibration's ranges
    again = _scales(fxquant.calibrate(prepared, _data(), progress=False))
    reference = _scales(fxquant.calibrate(_prepare(), _data(), progress=False))
    assert all(torch.equal(again[k], reference[k]) for k in reference)


def test_load_calib_amax_method_is_what_the_specs_say():
    prepared = fxquant.calibrate(_prepare("percentile"), _data(), progress=False)
    fxquant.load_calib_amax(prepared, "max")
    acts = {n: q for n, q in prepared.named_modules() if isinstance(q, fxquant.TensorQuantizer) and not q.constant}
    assert {q.spec.calib_method for q in acts.values()} == {"max"}
    entries = fxquant.encodings_of(prepared)["quantizers"]
    assert {entries[n]["calib_method"] for n in acts} == {"max"}
    # the max range of the input quantizer is the data's absolute maximum
    amax = max(float(x.abs().max()) for x in _data())
    assert float(acts["x_to_conv_quantizer"].amax) == pytest.approx(amax, rel=1e-6)


def test_every_error_is_an_fxquant_error():
    assert issubclass(CalibrationDataError, FxQuantError) and issubclass(CalibrationDataError, ValueError)


def test_quantize_takes_the_inputs_selector_too():
    xs = torch.cat(_data())
    loader = DataLoader(TensorDataset(xs, torch.arange(len(xs))), batch_size=2)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = fxquant.quantize(_Net().eval(), xs[:2], loader, progress=False, inputs=0)
    torch.manual_seed(0)
    model = _Net().eval()
    with torch.no_grad():
        assert fxquant.sqnr(model(xs), qmodel(xs)) > 30


@pytest.mark.parametrize("method", ["max", "mse", "percentile"])
def test_unsigned_specs_on_negative_data_raise_naming_the_quantizers(method):
    # before: calibrate() clipped every negative value to 0 in silence
    torch.manual_seed(0)
    config = QuantConfig(activation=QuantSpec(unsigned=True, calib_method=method))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TensorRT does not run unsigned Q/DQ: prepare warns so
        prepared = fxquant.prepare(_Net().eval(), _data(1)[0], config=config)
    with pytest.raises(fxquant.NegativeInputError, match=r"1 unsigned quantizer\(s\) saw negative calibration data "
                                                         r"\(`x_to_conv_quantizer`\): .*reaches -\d.*use "
                                                         r"unsigned=False"):
        fxquant.calibrate(prepared, _data(), progress=False)
    with pytest.raises(ConversionError, match="have no range yet"):  # the failed calibration left no ranges
        fxquant.convert(prepared)
    positive = [x.abs() for x in _data()]  # data that is non-negative everywhere: unsigned is right for it
    qmodel = fxquant.convert(fxquant.calibrate(prepared, positive, progress=False))
    assert qmodel.x_to_conv_quantizer.zero_point.dtype == torch.uint8
    with torch.no_grad():
        assert fxquant.sqnr(_Net().eval()(positive[0]), qmodel(positive[0])) > -100  # runs


def test_a_second_thread_calibrating_the_same_model_is_refused():
    # before: both calibrations ran at once and the ranges came from neither data set
    prepared = _prepare()
    small, large = _data(4), [x * 10 for x in _data(4, seed=1)]
    inside, second_done = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def first_batches():  # the first calibration is inside its loop while the second thread calls calibrate()
        yield small[0]
        inside.set()
        assert second_done.wait(60)
        yield from small[1:]

    def second():
        assert inside.wait(60)
        try:
            fxquant.calibrate(prepared, large, progress=False)
        except CalibrationError as exc:
            errors.append(exc)
        finally:
            second_done.set()

    thread = threading.Thread(target=second)
    thread.start()
    fxquant.calibrate(prepared, first_batches(), progress=False)
    thread.join()
    assert len(errors) == 1 and "calibrate() was called while calibrate() runs on this model (another thread)" in \
        str(errors[0])
    expected = _scales(fxquant.calibrate(_prepare(), small, progress=False))
    assert all(torch.equal(_scales(prepared)[k], v) for k, v in expected.items())  # the first call's data alone
    fxquant.calibrate(prepared, large, progress=False)  # and once it is done, the model calibrates again
    assert not torch.equal(_scales(prepared)["x_to_conv_quantizer"], expected["x_to_conv_quantizer"])
