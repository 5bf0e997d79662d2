"""DICOM test files made with pydicom from real scans, with patient data planted in them.

`make_dicom(arrays, variant, syntax)` stores greyscale uint8 slices (decoded from real JPEGs)
so that the modality rescale, the window and the photometric interpretation of `variant`
bring back the same picture: a reader that gets any of them wrong shows a different one.
Every file carries `PHI` (names, IDs, dates, free text, UIDs), which must never reach a
dataset, an inventory or a manifest. `bad_dicoms` makes one file per DICOM reject reason.
"""

from __future__ import annotations

import io

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000MC,
    MPEG4HP41,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    MRImageStorage,
)

from brainmri.data import images as im

# Planted in every file; the surname, IDs and UIDs are unusual enough that finding one of
# them anywhere in storage can only mean it leaked.
PHI = {
    "PatientName": "QUIXOTEFAKE^Dulcinea",
    "PatientID": "PID-77310593",
    "PatientBirthDate": "19370412",
    "AccessionNumber": "ACC90817263",
    "InstitutionName": "Hospital Zwetschgenbaum",
    "ReferringPhysicianName": "KRAMPUSDOC^Otto",
    "StudyDescription": "follow-up after ZZTOPSECRET resection",
    "StudyDate": "20191103",
    "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.11111111111111111111",
    "SeriesInstanceUID": "1.2.826.0.1.3680043.8.498.22222222222222222222",
    "SOPInstanceUID": "1.2.826.0.1.3680043.8.498.33333333333333333333",
}
# what a reader keeps: technical, no patient data (sequence and protocol names are kept)
QUALITY = {"Modality": "MR", "Manufacturer": "ACME Medical", "ManufacturerModelName": "Magnus 3T",
           "SequenceName": "*tse2d1_15", "ProtocolName": "t2_tse_tra", "SliceThickness": "5",
           "PixelSpacing": ["0.45", "0.45"]}
VARIANTS = ("mono2_8bit_no_window", "mono2_16bit_rescale_window", "signed_rescale_window",
            "mono1_12bit_window", "rgb", "ybr_full")


def phi_values() -> list[str]:
    """Every planted value, and the parts a writer might split it into."""
    out = []
    for v in PHI.values():
        out += [v, *[p for p in v.replace("^", " ").split() if len(p) >= 6]]
    return out


def _base(uids: dict | None = None) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = MRImageStorage
    for k, v in {**PHI, **QUALITY, **(uids or {})}.items():
        setattr(ds, k, v)
    return ds


def _stored(g: np.ndarray, variant: str) -> tuple[np.ndarray, dict]:
    """Stored values and pixel-module attributes whose display is g (uint8)."""
    g16 = g.astype(np.int32)
    win = {"WindowCenter": "128", "WindowWidth": "256"}  # maps 0..255 onto itself exactly
    if variant == "mono2_8bit_no_window":  # no window: the robust percentile window
        return g, dict(PhotometricInterpretation="MONOCHROME2", BitsAllocated=8, BitsStored=8)
    if variant == "mono2_16bit_rescale_window":
        return (g16 * 10 + 200).astype(np.uint16), dict(
            PhotometricInterpretation="MONOCHROME2", BitsAllocated=16, BitsStored=16,
            RescaleSlope="0.1", RescaleIntercept="-20", **win)
    if variant == "signed_rescale_window":
        return (g16 * 4 - 512).astype(np.int16), dict(
            PhotometricInterpretation="MONOCHROME2", BitsAllocated=16, BitsStored=16,
            PixelRepresentation=1, RescaleSlope="0.25", RescaleIntercept="128", **win)
    if variant == "mono1_12bit_window":  # minimum is white: stored inverted, shown upright
        return ((255 - g16) * 16).astype(np.uint16), dict(
            PhotometricInterpretation="MONOCHROME1", BitsAllocated=16, BitsStored=12,
            RescaleSlope="0.0625", RescaleIntercept="0", **win)
    rgb = np.repeat(g[..., None], 3, axis=-1)
    if variant == "rgb":
        return rgb, dict(PhotometricInterpretation="RGB", BitsAllocated=8, BitsStored=8)
    if variant == "ybr_full":
        from pydicom.pixels import convert_color_space

        return convert_color_space(rgb, "RGB", "YBR_FULL"), dict(
            PhotometricInterpretation="YBR_FULL", BitsAllocated=8, BitsStored=8)
    raise ValueError(variant)


def make_dataset(arrays: list[np.ndarray], variant: str = "mono2_16bit_rescale_window",
                 uids: dict | None = None) -> Dataset:
    """Uncompressed dataset (explicit VR little endian) of one or more equal-sized slices."""
    stored = [_stored(a, variant) for a in arrays]
    attrs = stored[0][1]
    ds = _base(uids)
    data = np.stack([s for s, _ in stored]) if len(arrays) > 1 else stored[0][0]
    ds.Rows, ds.Columns = arrays[0].shape
    ds.SamplesPerPixel = 3 if data.ndim == (4 if len(arrays) > 1 else 3) else 1
    if ds.SamplesPerPixel == 3:
        ds.PlanarConfiguration = 0
    ds.PixelRepresentation = 0
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.HighBit = ds.BitsStored - 1
    if len(arrays) > 1:
        ds.NumberOfFrames = len(arrays)
    ds.PixelData = np.ascontiguousarray(data).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def to_bytes(ds: Dataset, syntax=ExplicitVRLittleEndian, preamble: bool = True) -> bytes:
    """A Part 10 file in `syntax` (compressed with pydicom's encoders), or, without the
    preamble, a raw implicit-VR dataset as some old exports write them."""
    ds = ds.copy()
    ds.file_meta = ds.file_meta.copy()
    if syntax.is_transfer_syntax and syntax.is_compressed:
        ds.compress(syntax, generate_instance_uid=False)
    else:
        ds.file_meta.TransferSyntaxUID = syntax
    if syntax == ExplicitVRBigEndian and ds.BitsAllocated == 16:  # pydicom writes OW as given
        ds.PixelData = np.frombuffer(ds.PixelData, "<u2").astype(">u2").tobytes()
    buf = io.BytesIO()
    if not preamble:
        del ds.file_meta
        pydicom.dcmwrite(buf, ds, implicit_vr=True, little_endian=True, enforce_file_format=False)
    elif not syntax.is_transfer_syntax:  # a private one: say how the dataset is encoded
        pydicom.dcmwrite(buf, ds, implicit_vr=False, little_endian=True, enforce_file_format=True)
    else:
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def make_dicom(arrays: list[np.ndarray], variant: str = "mono2_16bit_rescale_window",
               syntax=ExplicitVRLittleEndian, preamble: bool = True, uids: dict | None = None) -> bytes:
    return to_bytes(make_dataset(arrays, variant, uids), syntax, preamble)


def enhanced_multiframe(arrays: list[np.ndarray]) -> bytes:
    """An enhanced-MR-style file: rescale and window only in per-frame functional groups,
    different for each frame (frame k stored as g * (k + 2) with slope 1 / (k + 2))."""
    ds = make_dataset([(a // 2) for a in arrays], "mono2_8bit_no_window")  # pixel module only
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelData = np.stack([a.astype(np.uint16) * (k + 2) for k, a in enumerate(arrays)]).tobytes()
    frames = []
    for k in range(len(arrays)):
        pvt, voi, item = Dataset(), Dataset(), Dataset()
        pvt.RescaleSlope, pvt.RescaleIntercept = f"{1 / (k + 2):.10f}", "0"
        voi.WindowCenter, voi.WindowWidth = "128", "256"
        item.PixelValueTransformationSequence, item.FrameVOILUTSequence = [pvt], [voi]
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = frames
    return to_bytes(ds)


def jpeg_in_dicom(jpeg: bytes, shape: tuple[int, int]) -> bytes:
    """A greyscale baseline JPEG file encapsulated as it is (JPEG Baseline transfer syntax)."""
    ds = _base()
    ds.Rows, ds.Columns = shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate([jpeg])
    ds["PixelData"].VR = "OB"
    return _encapsulated(ds, JPEGBaseline8Bit)


def jpeg_lossless_sv1(a: np.ndarray, precision: int = 16) -> bytes:
    """A JPEG lossless (process 14, first-order prediction: selection value 1) codestream of
    a 2-D unsigned array, written here (ITU-T T.81 annex H) because no installed package
    encodes it. One Huffman table gives every difference category (0..16) a 5-bit code."""
    x = a.astype(np.int64)
    pred = np.empty_like(x)
    pred[0, 0] = 1 << (precision - 1)
    pred[0, 1:] = x[0, :-1]  # first line: the sample to the left
    pred[1:, 0] = x[:-1, 0]  # first column: the sample above
    pred[1:, 1:] = x[1:, :-1]  # elsewhere: predictor 1, the left neighbour
    d = (x - pred).ravel()
    ssss = np.ceil(np.log2(np.abs(d) + 1)).astype(int)
    extra = np.where(d >= 0, d, d + (1 << ssss) - 1)
    bits = "".join(f"{c:05b}" + (f"{e:0{c}b}" if c else "") for c, e in zip(ssss.tolist(), extra.tolist(),
                                                                               strict=True))
    bits += "1" * (-len(bits) % 8)  # pad the last byte with ones
    data = int(bits, 2).to_bytes(len(bits) // 8, "big").replace(b"\xff", b"\xff\x00")  # byte stuffing

    def segment(marker: int, body: bytes) -> bytes:
        return bytes([0xFF, marker]) + (len(body) + 2).to_bytes(2, "big") + body

    rows, cols = a.shape
    sof = bytes([precision]) + rows.to_bytes(2, "big") + cols.to_bytes(2, "big") + bytes([1, 1, 0x11, 0])
    dht = bytes([0x00]) + bytes([0, 0, 0, 0, 17] + [0] * 11) + bytes(range(17))
    sos = bytes([1, 1, 0x00, 1, 0, 0])  # one component, table 0, Ss = predictor 1, Se = 0, Pt = 0
    return (b"\xff\xd8" + segment(0xC3, sof) + segment(0xC4, dht) + segment(0xDA, sos) + data
            + b"\xff\xd9")


def jpeg_lossless_dicom(ds: Dataset) -> bytes:
    """An uncompressed single-frame unsigned dataset re-encoded as JPEG Lossless SV1."""
    ds = ds.copy()
    dtype = np.uint16 if ds.BitsAllocated == 16 else np.uint8
    a = np.frombuffer(ds.PixelData, dtype).reshape(ds.Rows, ds.Columns)
    ds.PixelData = encapsulate([jpeg_lossless_sv1(a, ds.BitsStored)])
    ds["PixelData"].VR = "OB"
    return _encapsulated(ds, JPEGLosslessSV1)


def _encapsulated(ds: Dataset, syntax) -> bytes:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def bad_dicoms(g: np.ndarray) -> dict[str, tuple[bytes, str]]:
    """file name -> (bytes, the reason inspect_scans must give), one per DICOM reason."""
    good = make_dicom([g])
    no_pixels = make_dataset([g])
    del no_pixels.PixelData
    video = _base()
    video.Rows, video.Columns, video.SamplesPerPixel = 128, 128, 3
    video.PhotometricInterpretation, video.BitsAllocated, video.BitsStored = "YBR_PARTIAL_420", 8, 8
    video.PixelData = encapsulate([b"\x00\x00\x01\xb3" + b"\x11" * 500])
    video["PixelData"].VR = "OB"
    mc = make_dataset([g])
    mc.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x22" * 500])
    mc["PixelData"].VR = "OB"
    private = make_dataset([g])
    private.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.8.498.999.1"
    wrong = make_dataset([g])
    wrong.Rows = g.shape[0] * 2  # the header claims twice the pixels the file holds
    return {
        "no_pixels.dcm": (to_bytes(no_pixels), im.DICOM_NO_PIXELS),
        "video.dcm": (_encapsulated(video, MPEG4HP41), im.DICOM_VIDEO),
        "j2k_multicomponent.dcm": (_mc_bytes(mc), im.DICOM_NO_DECODER),
        "private_syntax.dcm": (to_bytes(private, private.file_meta.TransferSyntaxUID),
                               im.DICOM_UNSUPPORTED_SYNTAX),
        "truncated.dcm": (good[: len(good) // 2], im.DICOM_INCONSISTENT),
        "inconsistent.dcm": (to_bytes(wrong), im.DICOM_INCONSISTENT),
        # a sequence of undefined length whose items are garbage
        "garbage_after_magic.dcm": (b"\0" * 128 + b"DICM" + b"\x08\x00\x15\x11SQ\0\0\xff\xff\xff\xff"
                                    + b"\x01\x02\x03\x04" * 40, im.DICOM_UNREADABLE),
        "float_pixels.dcm": (_float_pixels(g), im.UNSUPPORTED_MODE),
        "implicit_headerless_ok": (make_dicom([g], preamble=False), ""),  # accepted: not bad
    }


def _mc_bytes(ds: Dataset) -> bytes:
    ds.file_meta.TransferSyntaxUID = JPEG2000MC
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _float_pixels(g: np.ndarray) -> bytes:
    ds = make_dataset([g])
    del ds.PixelData
    ds.BitsAllocated = 32
    ds.FloatPixelData = g.astype(np.float32).tobytes()
    return to_bytes(ds, ImplicitVRLittleEndian)
