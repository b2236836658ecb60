"""What each synthetic layout contains: cameras, which person appears where, file names and index files.

The plans mirror the real datasets' trees so that the real adapters read them unchanged:

* ``sysu``: ``cam1..cam6/<pid:04d>/<idx:04d>.jpg`` and ``exp/{train,val,test}_id.txt``; visible cameras
  1, 2 (indoor) and 4, 5 (outdoor), infrared 3 (indoor, the room of camera 2) and 6 (outdoor); the
  indoor cameras see about half of the people.  Identities are split 60/20/20 into train/val/test.
* ``regdb``: ``Visible/<id>/<sex>_<front|back>_v_<counter:05d>_<id>.bmp``, the same under ``Thermal/``
  with ``_t_``, one co-located camera pair; ``idx/{train,test}_{visible,thermal}_{1..10}.txt`` hold ten
  random half/half identity splits, each line ``Visible/<id>/<file>.bmp <label>``, labels 0..n-1 over
  the split's sorted ids (as in the released index files).
* ``llcm``: nine dual-mode cameras (visible 1..9, near-infrared 1, 2, 4..9 as in the reference test
  code), training images ``vis/<pid>/<pid>_c<cc>_s<seq>_f<frame>_vis.jpg`` (``nir``/``_nir`` likewise)
  listed in ``idx/train_{vis,nir}.txt`` with labels 0..n-1, test images under
  ``test_{vis,nir}/cam<c>/<pid:04d>/``, test ids in ``idx/test_id.txt``; two thirds of the ids train.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vireid.data.records import Modality
from vireid.data.synthetic.identity import sample_identity
from vireid.data.synthetic.params import TAG_PRESENCE, TAG_SPLIT, TAG_VIEW, Difficulty, stream
from vireid.data.synthetic.scene import CameraSpec, make_camera
from vireid.errors import InputError

LAYOUT_CODES = {"sysu": 1, "regdb": 2, "llcm": 3}
DEFAULT_IMAGES_PER_CAMERA = {"sysu": 10, "regdb": 10, "llcm": 5}

SYSU_CAMERAS = ((1, Modality.VISIBLE, 1, True), (2, Modality.VISIBLE, 2, True), (3, Modality.INFRARED, 2, True),
                (4, Modality.VISIBLE, 4, False), (5, Modality.VISIBLE, 5, False), (6, Modality.INFRARED, 6, False))
"""(camera, modality, scene, indoor): SYSU-MM01 camera 3 films the room of camera 2."""
SYSU_PRESENCE = {1: 0.45, 2: 0.45, 3: 0.8, 4: 0.85, 5: 0.85, 6: 0.85}
LLCM_VISIBLE_CAMERAS = tuple(range(1, 10))
LLCM_INFRARED_CAMERAS = (1, 2, 4, 5, 6, 7, 8, 9)
LLCM_PRESENCE = 0.45


@dataclass(frozen=True)
class ImageJob:
    """One image to render: where it goes and whom, by which camera, it shows."""

    relpath: str
    pid: int
    cam: int
    modality: Modality
    index: int
    viewpoint: str | None = None


@dataclass(frozen=True)
class LayoutPlan:
    layout: str
    image_format: str
    cameras: dict[tuple[int, Modality], CameraSpec]
    jobs: tuple[ImageJob, ...]
    index_files: dict[str, str]
    """Root-relative path -> text of the split / index files."""
    managed: tuple[str, ...]
    """Top-level names this layout writes (what a rebuild may remove)."""
    folders: tuple[str, ...]
    """Folders the real dataset always has, created even when no image falls into them."""
    splits: dict[str, tuple[int, ...]] = field(default_factory=dict)


def plan_layout(layout: str, num_ids: int, seed: int, images_per_camera: int, difficulty: Difficulty) -> LayoutPlan:
    """The complete plan of a synthetic ``layout`` with person ids 1..num_ids."""
    if layout not in LAYOUT_CODES:
        raise InputError(f"unknown synthetic layout {layout!r} (choose from {', '.join(LAYOUT_CODES)})")
    minimum = 3 if layout == "sysu" else 2
    if num_ids < minimum:
        raise InputError(f"number of identities (--ids): the {layout} layout needs at least {minimum}, got {num_ids}")
    if images_per_camera < 1:
        raise InputError(f"images per camera (--images-per-camera): expected a positive integer, got {images_per_camera}")
    planner = {"sysu": _plan_sysu, "regdb": _plan_regdb, "llcm": _plan_llcm}[layout]
    return planner(num_ids, seed, images_per_camera, difficulty)


def _split(pids: list[int], seed: int, layout: str, fractions: tuple[float, ...], key: int = 0) -> list[list[int]]:
    """Random disjoint groups of ``pids`` with the given fractions (the last takes the rest), each sorted."""
    order = stream(seed, TAG_SPLIT, LAYOUT_CODES[layout], key).permutation(pids).tolist()
    groups, start = [], 0
    for fraction in fractions[:-1]:
        size = min(max(1, round(fraction * len(pids))), len(pids) - start - (len(fractions) - len(groups) - 1))
        groups.append(sorted(order[start:start + size]))
        start += size
    groups.append(sorted(order[start:]))
    return groups


def _id_line(ids: list[int]) -> str:
    return ",".join(str(i) for i in ids) + "\n"


def _plan_sysu(num_ids: int, seed: int, per_camera: int, difficulty: Difficulty) -> LayoutPlan:
    code = LAYOUT_CODES["sysu"]
    cameras = {(c, m): make_camera(seed, code, c, m, s, indoor, difficulty) for c, m, s, indoor in SYSU_CAMERAS}
    jobs = []
    for pid in range(1, num_ids + 1):
        rng = stream(seed, TAG_PRESENCE, code, pid)
        present = {cam for cam, p in SYSU_PRESENCE.items() if rng.random() < p}
        if not present & {1, 2, 4, 5}:
            present.add(int(rng.choice([1, 2, 4, 5])))
        if not present & {3, 6}:
            present.add(int(rng.choice([3, 6])))
        for cam, modality, _, _ in SYSU_CAMERAS:
            if cam in present:
                jobs += [ImageJob(f"cam{cam}/{pid:04d}/{i:04d}.jpg", pid, cam, modality, i) for i in range(1, per_camera + 1)]
    train, val, test = _split(list(range(1, num_ids + 1)), seed, "sysu", (0.6, 0.2, 0.2))
    index = {"exp/train_id.txt": _id_line(train), "exp/val_id.txt": _id_line(val), "exp/test_id.txt": _id_line(test)}
    return LayoutPlan("sysu", "JPEG", cameras, tuple(jobs), index,
                      managed=tuple(f"cam{c}" for c in range(1, 7)) + ("exp",),
                      folders=tuple(f"cam{c}" for c in range(1, 7)) + ("exp",),
                      splits={"train": tuple(train), "val": tuple(val), "test": tuple(test)})


def _plan_regdb(num_ids: int, seed: int, per_camera: int, difficulty: Difficulty) -> LayoutPlan:
    code = LAYOUT_CODES["regdb"]
    folders = {Modality.VISIBLE: ("Visible", "v", 1), Modality.INFRARED: ("Thermal", "t", 2)}
    cameras = {(cam, m): make_camera(seed, code, cam, m, 1, False, difficulty) for m, (_, _, cam) in folders.items()}
    jobs: list[ImageJob] = []
    files: dict[tuple[int, Modality], list[str]] = {}
    counters = {m: 0 for m in folders}
    for pid in range(1, num_ids + 1):
        sex = "female" if sample_identity(seed, pid, num_ids, difficulty).female else "male"
        for modality, (folder, letter, cam) in folders.items():
            views = stream(seed, TAG_VIEW, code, pid, int(modality)).choice(["front", "back"], per_camera)
            names = []
            for i, view in enumerate(views):
                counters[modality] += 1
                rel = f"{folder}/{pid}/{sex}_{view}_{letter}_{counters[modality]:05d}_{pid}.bmp"
                jobs.append(ImageJob(rel, pid, cam, modality, i + 1, viewpoint=str(view)))
                names.append(rel)
            files[(pid, modality)] = names
    index = {}
    for trial in range(1, 11):
        train, test = _split(list(range(1, num_ids + 1)), seed, "regdb", (0.5, 0.5), key=trial)
        for split, ids in (("train", train), ("test", test)):
            for modality, name in ((Modality.VISIBLE, "visible"), (Modality.INFRARED, "thermal")):
                lines = [f"{rel} {label}" for label, pid in enumerate(ids) for rel in files[(pid, modality)]]
                index[f"idx/{split}_{name}_{trial}.txt"] = "\n".join(lines) + "\n"
    return LayoutPlan("regdb", "BMP", cameras, tuple(jobs), index, managed=("Visible", "Thermal", "idx"),
                      folders=("Visible", "Thermal", "idx"))


def _plan_llcm(num_ids: int, seed: int, per_camera: int, difficulty: Difficulty) -> LayoutPlan:
    code = LAYOUT_CODES["llcm"]
    cameras = {}
    for cam in LLCM_VISIBLE_CAMERAS:
        rng = stream(seed, TAG_PRESENCE, code, 0, cam)
        indoor, low_light = bool(rng.random() < 0.5), bool(rng.random() < 0.7)
        cameras[(cam, Modality.VISIBLE)] = make_camera(seed, code, cam, Modality.VISIBLE, cam, indoor, difficulty, low_light)
        if cam in LLCM_INFRARED_CAMERAS:
            cameras[(cam, Modality.INFRARED)] = make_camera(seed, code, cam, Modality.INFRARED, cam, indoor, difficulty)
    train, test = _split(list(range(1, num_ids + 1)), seed, "llcm", (2 / 3, 1 / 3))
    train_set = set(train)
    labels = {pid: i for i, pid in enumerate(train)}
    jobs = []
    lists: dict[Modality, list[str]] = {Modality.VISIBLE: [], Modality.INFRARED: []}
    for pid in range(1, num_ids + 1):
        rng = stream(seed, TAG_PRESENCE, code, pid)
        present = {m: [c for c in cams if rng.random() < LLCM_PRESENCE]
                   for m, cams in ((Modality.VISIBLE, LLCM_VISIBLE_CAMERAS), (Modality.INFRARED, LLCM_INFRARED_CAMERAS))}
        for m, cams in ((Modality.VISIBLE, LLCM_VISIBLE_CAMERAS), (Modality.INFRARED, LLCM_INFRARED_CAMERAS)):
            if not present[m]:
                present[m] = [int(rng.choice(cams))]
        if present[Modality.VISIBLE] == present[Modality.INFRARED] and len(present[Modality.VISIBLE]) == 1:
            others = [c for c in LLCM_VISIBLE_CAMERAS if c not in present[Modality.INFRARED]]
            present[Modality.VISIBLE] = sorted(present[Modality.VISIBLE] + [int(rng.choice(others))])
        for modality, suffix in ((Modality.VISIBLE, "vis"), (Modality.INFRARED, "nir")):
            for cam in present[modality]:
                sequence = int(rng.integers(100000, 240000))
                frame0 = int(rng.integers(100, 5000))
                for i in range(1, per_camera + 1):
                    name = f"{pid:04d}_c{cam:02d}_s{sequence:06d}_f{frame0 + 25 * i:04d}_{suffix}.jpg"
                    if pid in train_set:
                        rel = f"{suffix}/{pid:04d}/{name}"
                        lists[modality].append(f"{rel} {labels[pid]}")
                    else:
                        rel = f"test_{suffix}/cam{cam}/{pid:04d}/{name}"
                    jobs.append(ImageJob(rel, pid, cam, modality, i))
    index = {
        "idx/train_vis.txt": "\n".join(lists[Modality.VISIBLE]) + "\n",
        "idx/train_nir.txt": "\n".join(lists[Modality.INFRARED]) + "\n",
        "idx/test_id.txt": _id_line(test),
    }
    return LayoutPlan("llcm", "JPEG", cameras, tuple(jobs), index,
                      managed=("vis", "nir", "test_vis", "test_nir", "idx"),
                      folders=("vis", "nir", "idx", *(f"test_vis/cam{c}" for c in LLCM_VISIBLE_CAMERAS),
                               *(f"test_nir/cam{c}" for c in LLCM_INFRARED_CAMERAS)),
                      splits={"train": tuple(train), "test": tuple(test)})
