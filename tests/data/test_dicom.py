"""fedmed.data.dicom: the display pipeline on synthetic files, real files, and bad files."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from fedmed.data.dicom import DicomError, apply_window, read_dicom

RAMP = np.arange(0, 1000, 10, dtype=np.uint16).reshape(10, 10)  # stored values 0..990


def test_rescale_slope_intercept_is_applied(tmp_path, dicom_file):
    # stored 500 → 2*500 - 1000 = 0 HU; a window centred on 0 HU maps it to ~0.5
    pixels = np.full((8, 8), 500, dtype=np.uint16)
    pixels[0, 0], pixels[0, 1] = 0, 1000
    rescaled = dicom_file(tmp_path / "ct.dcm", pixels, slope=2.0, intercept=-1000.0)
    plain = dicom_file(tmp_path / "raw.dcm", pixels)
    img = read_dicom(rescaled, window=(0.0, 2000.0))
    assert img[4, 4] == pytest.approx(0.5, abs=1e-3)
    assert img[0, 0] == pytest.approx(0.0, abs=1e-3) and img[0, 1] == pytest.approx(1.0, abs=1e-3)
    assert read_dicom(plain, window=(0.0, 2000.0))[4, 4] == pytest.approx(0.75, abs=1e-3)


@pytest.mark.parametrize(
    "file_window, explicit, stored, expected",
    [
        ((500.0, 200.0), None, 390, 0.0),    # below center - width/2
        ((500.0, 200.0), None, 610, 1.0),    # above center + width/2
        ((500.0, 200.0), None, 500, 0.5),    # the centre
        ((500.0, 200.0), (100.0, 200.0), 500, 1.0),  # explicit window wins over the file's
        (None, None, 0, 0.0),                # min-max without any window
        (None, None, 990, 1.0),
    ],
)
def test_windowing(tmp_path, dicom_file, file_window, explicit, stored, expected):
    path = dicom_file(tmp_path / "w.dcm", RAMP, window=file_window)
    img = read_dicom(path, window=explicit)
    r, c = divmod(stored // 10, 10)
    assert img[r, c] == pytest.approx(expected, abs=0.01)
    assert img.dtype == np.float32 and img.shape == (10, 10)


def test_apply_window_functions():
    x = np.array([-100.0, 0.0, 100.0])
    assert apply_window(x, (0, 100), function="LINEAR_EXACT").tolist() == [0.0, 0.5, 1.0]
    sig = apply_window(x, (0, 100), function="SIGMOID")
    assert sig[1] == pytest.approx(0.5) and 0 < sig[0] < sig[2] < 1


def test_monochrome1_is_inverted(tmp_path, dicom_file):
    m1 = read_dicom(dicom_file(tmp_path / "m1.dcm", RAMP, photometric="MONOCHROME1"))
    m2 = read_dicom(dicom_file(tmp_path / "m2.dcm", RAMP, photometric="MONOCHROME2"))
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)
    assert m2[0, 0] == 0.0 and m1[0, 0] == 1.0


def test_constant_image_gives_zeros(tmp_path, dicom_file):
    img = read_dicom(dicom_file(tmp_path / "c.dcm", np.full((6, 6), 7, dtype=np.uint16)))
    assert not np.isnan(img).any() and (img == 0).all()


def test_multiframe_gives_middle_frame(tmp_path, dicom_file):
    frames = np.stack([np.full((4, 4), v, dtype=np.uint16) for v in (100, 500, 900)])
    frames[:, 0, 0] = 0
    img = read_dicom(dicom_file(tmp_path / "mf.dcm", frames), window=(500.0, 200.0))
    assert img.shape == (4, 4) and img[2, 2] == pytest.approx(0.5, abs=0.01)


def test_rgb_file(tmp_path, dicom_file):
    rgb = np.zeros((5, 6, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    img = read_dicom(dicom_file(tmp_path / "rgb.dcm", rgb, photometric="RGB"))
    assert img.shape == (5, 6, 3)
    np.testing.assert_allclose(img[0, 0], [1.0, 0.0, 0.0])


def _testfile(name: str) -> str:
    data = pytest.importorskip("pydicom.data")
    path = data.get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} not available (pip install pydicom-data)")
    return str(path)


@pytest.mark.parametrize("name, ndim", [("CT_small.dcm", 2), ("MR_small.dcm", 2),
                                        ("SC_rgb.dcm", 3), ("SC_ybr_full_uncompressed.dcm", 3)])
def test_real_files_load(name, ndim):
    img = read_dicom(_testfile(name))
    assert img.ndim == ndim and img.dtype == np.float32
    assert 0.0 <= img.min() < img.max() <= 1.0


@pytest.mark.parametrize("name", ["JPEG2000.dcm", "MR_small_RLE.dcm", "SC_rgb_jpeg_dcmtk.dcm",
                                  "MR_small_jpeg_ls_lossless.dcm", "JPEG-LL.dcm",
                                  "JPGExtended.dcm", "SC_rgb_jpeg_lossy_gdcm.dcm"])
def test_real_compressed_files(name):
    """JPEG-LS, JPEG Lossless (process 14), 12-bit JPEG Extended, J2K, RLE: the plugins decode."""
    img = read_dicom(_testfile(name))
    assert 0.0 <= img.min() < img.max() <= 1.0


# pydicom-data's compressed files that are NOT decodable images, each with why (its README):
# a cut-off file, a J2K stream with 4 bytes overwritten, the non-standard NM1_JPLY stream
# (JPGExtended.dcm is its fixed copy) and a dataset with no pixel data at all.
_BROKEN = {
    "emri_small_jpeg_2k_lossless_too_short.dcm": "truncated",
    "JPEG2000-embedded-sequence-delimiter.dcm": "compressed stream is damaged",
    "JPEG-lossy.dcm": "compressed stream is damaged",
    "UN_sequence.dcm": "no pixel data",
}


def test_every_compressed_pydicom_data_file_decodes_or_says_why():
    data = pytest.importorskip("pydicom.data")
    compressed: dict[str, str] = {}
    for path in data.get_testdata_files("*"):
        try:
            ts = pydicom.dcmread(path, stop_before_pixels=True).file_meta.get("TransferSyntaxUID")
        except Exception:
            continue
        if ts is not None and ts.is_compressed:
            compressed[path] = ts.name
    if len(compressed) < 50:
        pytest.skip(f"only {len(compressed)} compressed files found (pip install pydicom-data)")
    decoded, refused = [], {}
    for path in compressed:
        try:
            img = read_dicom(path)
            assert img.dtype == np.float32 and np.isfinite(img).all()
            decoded.append(path)
        except DicomError as exc:
            refused[path.rsplit("/", 1)[-1]] = str(exc)
    assert set(refused) == set(_BROKEN), refused
    for name, reason in _BROKEN.items():
        assert reason in refused[name] and "plugin:" not in refused[name]
    # 60 compressed files in pydicom-data 1.0 (JPEG baseline/extended/lossless, JPEG-LS,
    # J2K, RLE): 56 are images and decode.
    assert len(decoded) == len(compressed) - len(_BROKEN) >= 56


@pytest.mark.parametrize("policy, expected", [("middle", 0.5), ("first", 0.0)])
def test_multiframe_policy_picks_the_frame(tmp_path, dicom_file, policy, expected):
    frames = np.stack([np.full((4, 4), v, dtype=np.uint16) for v in (400, 500, 900)])
    frames[:, 0, 0] = 0
    img = read_dicom(dicom_file(tmp_path / "mf.dcm", frames), window=(500.0, 200.0),
                     multiframe=policy)
    assert img[2, 2] == pytest.approx(expected, abs=0.01)


def test_multiframe_refuse_names_the_policy(tmp_path, dicom_file):
    frames = np.zeros((3, 4, 4), dtype=np.uint16)
    with pytest.raises(DicomError, match="3 frames.*data.multiframe=refuse"):
        read_dicom(dicom_file(tmp_path / "mf.dcm", frames), multiframe="refuse")
    single = read_dicom(dicom_file(tmp_path / "one.dcm", frames[0] + 1), multiframe="refuse")
    assert single.shape == (4, 4)


def test_codec_report_lists_the_pacs_syntaxes():
    from fedmed.data.dicom import codec_report

    report = codec_report()
    for name in ("JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14 "
                 "[Selection Value 1])", "JPEG-LS Lossless Image Compression",
                 "JPEG Extended (Process 2 and 4)", "JPEG 2000 Image Compression", "RLE Lossless"):
        assert report[name] is True, name


def test_ybr_matches_rgb():
    rgb = read_dicom(_testfile("SC_rgb.dcm"))
    ybr = read_dicom(_testfile("SC_ybr_full_uncompressed.dcm"))
    np.testing.assert_allclose(rgb, ybr, atol=0.03)  # YBR rounding only


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p, w: p.write_bytes(np.random.default_rng(0).bytes(4096)), "not a DICOM file"),
        (lambda p, w: p.write_bytes(b""), "not a DICOM file"),
        (lambda p, w: p.write_bytes(w.read_bytes()[: len(w.read_bytes()) - 100]),
         "could not be decoded"),
    ],
    ids=["random-bytes", "empty", "truncated"],
)
def test_corrupt_files_say_why_without_the_file_name(tmp_path, dicom_file, make, reason):
    good = dicom_file(tmp_path / "good.dcm", RAMP)
    bad = tmp_path / "MRN-777123_chest.dcm"  # a file name made from a patient id
    make(bad, good)
    with pytest.raises(DicomError, match=reason) as err:
        read_dicom(bad)
    msg = str(err.value)
    assert "MRN-777123" not in msg and str(tmp_path) not in msg and "SECRET" not in msg
    assert err.value.path == str(bad)  # for the site's own log


def test_no_pixel_data_and_missing_file(tmp_path, dicom_file):
    path = dicom_file(tmp_path / "nopix.dcm", RAMP)
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(DicomError, match="no pixel data"):
        read_dicom(path)
    with pytest.raises(DicomError, match="not found"):
        read_dicom(tmp_path / "absent.dcm")
