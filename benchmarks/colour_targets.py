"""Write two small colour (RGB) image classification data sets, shipped inside Debian packages, as Graft targets.

Both work offline: their image files come inside Debian packages, so nothing is downloaded while this runs.
Graft has never been tuned on either. Each is written as DIR/<class>/<index>.png (RGB, --size px square,
white background). The subset is stratified and seeded: --per-class images a class, drawn with --seed
from what the class has. Every data file read is checked against a sha256 pinned below, so the same
arguments always write the same images.

  noto-emoji   Google's Noto Color Emoji pictures (one drawing per emoji), labelled by their Unicode emoji
               group. 9 classes, in --classes order: smileys-emotion, people-body, animals-nature,
               food-drink, travel-places, activities, objects, symbols, flags. 1,747 distinct images,
               85 to 261 a class (activities has the fewest, 85). The pictures are drawn from the colour
               font, and the labels come from Unicode's emoji-test.txt. Left out as near-copies of their
               base emoji: skin-tone variants, hair-style variants and the man/woman variants made with a
               zero-width joiner. Some close copies remain (keycaps, person/man/woman pairs, some flags).
               Licence: the pictures are Apache-2.0 and the font is SIL OFL-1.1 (Google); emoji-test.txt
               is under the Unicode licence (permissive).
  openclipart  Open Clip Art Library drawings (release 0.18, many artists), labelled by the library's
               top-level category. 10 classes, in --classes order: animals, food, people, transportation,
               plants, tools, office, buildings, geography, computer. 3,352 usable images, 66 to 1,753 a
               class (plants 66, buildings 68, office 107, tools 121, geography 130, the rest 165 or more).
               Some are black-and-white line art. The package's 1,221 symlinks are skipped: they file a
               drawing a second time under a subcategory. A drawing whose bytes appear in two classes is
               skipped too, and so are 7 drawings over 25 Mpx.
               Licence: public domain (Creative Commons Public Domain Dedication).

Install (for benchmarks only: never add these to pyproject.toml):

  noto-emoji:   apt-get update && apt-get install -y --no-install-recommends \
                    fonts-noto-color-emoji=2.042-0+deb12u1 unicode-data=15.0.0-1     # 9.9 MB + 8.0 MB .deb
  openclipart:  apt-get update && apt-get install -y --no-install-recommends \
                    openclipart-png=1:0.18+dfsg-19                                    # 131 MB .deb, 151 MB installed

Without installing, fetch the .deb files (`apt-get download fonts-noto-color-emoji unicode-data
openclipart-png`) and pass each one with --wheel (also spelled --deb), or unpack them with `dpkg-deb -x FILE.deb DIR`
and pass --root DIR.

Usage:

  python benchmarks/colour_targets.py noto-emoji  --out /tmp/noto-emoji  [--per-class 100] [--classes 9]
  python benchmarks/colour_targets.py openclipart --out /tmp/openclipart [--per-class 100] [--classes 10]
      [--size 48] [--seed 0] [--wheel FILE.deb ...] [--root DIR] [--manifest FILE.json]

--per-class 0 writes every usable image. --classes K keeps the first K classes, in the orders given above.
Then `graft data add DIR --as target` brings the folder into a project.

Needs only Pillow (and the Python standard library). The script reads PNG, TrueType and text files, and
never unpickles anything.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import subprocess
import sys
import tarfile
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from PIL import Image, ImageDraw, ImageFont

# --- Pins ------------------------------------------------------------------------------------------------

EMOJI_FONT = "usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
EMOJI_TEST = "usr/share/unicode/emoji/emoji-test.txt"
EMOJI_SHA256 = {  # from fonts-noto-color-emoji 2.042-0+deb12u1 and unicode-data 15.0.0-1
    EMOJI_FONT: "e5899ed38b8ed83e08bd3ac5de09791e9d19d288333a796de1d35ad17396f1ec",
    EMOJI_TEST: "8445f23ac8388e096be19d0262e14fceff856ff52093f2356dc89485f1a853db",
}
CLIPART_ROOT = "usr/share/openclipart/png"
# sha256 of the lines "<sha256 of the file>  <path under CLIPART_ROOT>\n" over every regular *.png file in
# openclipart-png 1:0.18+dfsg-19 (6,900 files, symlinks left out), sorted by path.
CLIPART_TREE_SHA256 = "9f621ff33c5c55d146794deb958f6d24c4c0f6430e63f8276678ce5b414cc788"
CLIPART_FILES = 6900
# The .deb files these came from (Debian 12 bookworm, all architectures). A given .deb is only reported as
# matching or not: the files read from it are what is checked.
DEB_SHA256 = {
    "fonts-noto-color-emoji": "a5ab0f69c7938423862320d9aca5dd187b3fd879d6a9a57dd52e17c3fa8d2751",
    "unicode-data": "5efef23bbb1c6a133ecbdd63a2cfa07159ccacf5466a49e2426101c5ecd691fc",
    "openclipart-png": "f07f1545a2970c2cf3fa339bc2405da1a95cf2b1827bfa05bf73eb1c20291c02",
}

EMOJI_GROUPS = {  # emoji-test.txt group -> class folder, in the order --classes counts them
    "Smileys & Emotion": "smileys-emotion",
    "People & Body": "people-body",
    "Animals & Nature": "animals-nature",
    "Food & Drink": "food-drink",
    "Travel & Places": "travel-places",
    "Activities": "activities",
    "Objects": "objects",
    "Symbols": "symbols",
    "Flags": "flags",
}
CLIPART_CLASSES = ["animals", "food", "people", "transportation", "plants", "tools", "office", "buildings",
                   "geography", "computer"]

DATASETS = {
    "noto-emoji": {
        "packages": {"fonts-noto-color-emoji": "2.042-0+deb12u1", "unicode-data": "15.0.0-1"},
        "licence": "pictures Apache-2.0, font SIL OFL-1.1 (Google Noto Color Emoji); labels from Unicode "
                   "emoji-test.txt 15.0 (Unicode licence)",
        "install": "apt-get install -y --no-install-recommends fonts-noto-color-emoji=2.042-0+deb12u1 "
                   "unicode-data=15.0.0-1",
    },
    "openclipart": {
        "packages": {"openclipart-png": "1:0.18+dfsg-19"},
        "licence": "public domain (Creative Commons Public Domain Dedication; "
                   "/usr/share/doc/openclipart-png/copyright)",
        "install": "apt-get install -y --no-install-recommends openclipart-png=1:0.18+dfsg-19",
    },
}

MAX_PIXELS = 25_000_000  # a drawing bigger than this (a few are 10k x 16k px) is skipped, not decoded
WORK_SIDE = 1024         # large drawings are box-reduced to about this before cropping


class DataError(Exception):
    pass


# --- Reading package files: installed, or straight out of .deb files --------------------------------------

def _ar_members(data: bytes) -> dict[str, bytes]:
    """The members of a Debian package (a Unix ar archive)."""
    if not data.startswith(b"!<arch>\n"):
        raise DataError("not a .deb (ar) archive")
    members, pos = {}, 8
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        members[name] = data[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)
    return members


def _open_tar(name: str, blob: bytes) -> tarfile.TarFile:
    """A tar member of a .deb, read as a stream (members in order, nothing decompressed twice)."""
    for suffix, mode in ((".xz", "r|xz"), (".gz", "r|gz"), (".tar", "r|")):
        if name.endswith(suffix):
            return tarfile.open(fileobj=io.BytesIO(blob), mode=mode)
    raise DataError(f"{name}: compression not supported here (xz, gz or none); install the package instead")


@dataclass
class Deb:
    path: Path
    package: str
    version: str
    sha256: str
    files: dict[str, bytes] = field(default_factory=dict)  # regular files only, path without leading ./

    @classmethod
    def read(cls, path: Path, wanted) -> "Deb":
        blob = path.read_bytes()
        members = _ar_members(blob)
        control_name = next((n for n in members if n.startswith("control.tar")), None)
        data_name = next((n for n in members if n.startswith("data.tar")), None)
        if control_name is None or data_name is None:
            raise DataError(f"{path}: no control.tar or data.tar inside")
        fields = {}
        with _open_tar(control_name, members[control_name]) as tar:
            for member in tar:
                if member.isfile() and member.name.removeprefix("./") == "control":
                    for line in tar.extractfile(member).read().decode("utf-8").splitlines():
                        if ":" in line and not line.startswith(" "):
                            key, value = line.split(":", 1)
                            fields[key] = value.strip()
        deb = cls(path, fields.get("Package", "?"), fields.get("Version", "?"), hashlib.sha256(blob).hexdigest())
        with _open_tar(data_name, members[data_name]) as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if member.isfile() and wanted(name):
                    deb.files[name] = tar.extractfile(member).read()
        return deb


class Files:
    """The files of the packages a data set needs: from the given .deb files, else from the installed system."""

    def __init__(self, packages: dict[str, str], debs: list[Path], wanted, root: Path = Path("/")):
        self.packages = packages
        self.root = root
        self.debs: dict[str, Deb] = {}
        for path in debs:
            if path.suffix == ".whl":
                raise DataError(f"{path}: these data sets come in Debian packages (.deb), not wheels")
            deb = Deb.read(path, wanted)
            if deb.package not in packages:
                raise DataError(f"{path} holds package {deb.package}; this data set needs {', '.join(packages)}")
            self.debs[deb.package] = deb
        self.installed = [name for name in packages if name not in self.debs]

    def origin(self) -> str:
        parts = [f"{d.package} {d.version} ({d.path.name}, sha256 {d.sha256[:12]}..., "
                 f"{'the pinned .deb' if DEB_SHA256.get(d.package) == d.sha256 else 'not the pinned .deb'})"
                 for d in self.debs.values()]
        where = "installed" if self.root == Path("/") else f"files under {self.root}"
        parts += [f"{name} {installed_version(name, self.root)} ({where})" for name in self.installed]
        return "Debian " + " + ".join(parts)

    def read(self, path: str) -> bytes:
        for deb in self.debs.values():
            if path in deb.files:
                return deb.files[path]
        file = self.root / path
        if not file.is_file():
            raise DataError(f"{file} is missing: install it ({self.hint()}) or pass the .deb with --wheel")
        return file.read_bytes()

    def tree(self, root: str, suffix: str) -> dict[str, bytes]:
        """Every regular file under root ending in suffix (symlinks left out), by path relative to root."""
        prefix = root.rstrip("/") + "/"
        for deb in self.debs.values():
            found = {name[len(prefix):]: data for name, data in deb.files.items()
                     if name.startswith(prefix) and name.endswith(suffix)}
            if found:
                return found
        folder = self.root / root
        if not folder.is_dir():
            raise DataError(f"{folder} is missing: install it ({self.hint()}) or pass the .deb with --wheel")
        return {file.relative_to(folder).as_posix(): file.read_bytes()
                for file in sorted(folder.rglob(f"*{suffix}")) if file.is_file() and not file.is_symlink()}

    def hint(self) -> str:
        return "apt-get install -y " + " ".join(f"{name}={version}" for name, version in self.packages.items())


def installed_version(package: str, root: Path) -> str:
    """dpkg's word for an installed package, else the first line of its Debian changelog under root."""
    if root == Path("/"):
        try:
            done = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True,
                                  timeout=30)
            if done.returncode == 0 and done.stdout.strip():
                return done.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    changelog = root / "usr/share/doc" / package / "changelog.Debian.gz"
    try:
        first = zlib.decompress(changelog.read_bytes(), 47).split(b"\n", 1)[0].decode("utf-8", "replace")
        return first.split("(", 1)[1].split(")", 1)[0]
    except (OSError, IndexError, zlib.error):
        return "unknown version"


def check_sha256(name: str, data: bytes, expected: str) -> str:
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected:
        raise DataError(f"{name}: sha256 {digest} is not the pinned {expected}; another package version? "
                        f"This script is pinned to the versions in its docstring.")
    return digest


# --- Turning a drawing into a small RGB square -------------------------------------------------------------

def to_square(image: Image.Image, size: int, crop_alpha: bool) -> Image.Image | None:
    """Crop to the drawing (what is not transparent, or not white), centre it on a white square, resize."""
    image = image.convert("RGBA")
    if crop_alpha:
        box = image.getchannel("A").point(lambda a: 255 if a > 8 else 0).getbbox()
        if box is None:
            return None
        image = image.crop(box)
    flat = Image.new("RGB", image.size, (255, 255, 255))
    flat.paste(image, mask=image.getchannel("A"))
    ink = flat.convert("L").point(lambda v: 255 if v < 248 else 0).getbbox()  # not white
    if ink is None:
        return None
    flat = flat.crop(ink)
    if min(flat.size) < 2 and max(flat.size) < 8:
        return None
    side = max(flat.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(flat, ((side - flat.width) // 2, (side - flat.height) // 2))
    return square.resize((size, size), Image.Resampling.LANCZOS)


def open_drawing(data: bytes) -> Image.Image | str:
    """A clip-art PNG, decoded and box-reduced when large, or the reason it is skipped."""
    Image.MAX_IMAGE_PIXELS = None  # sizes are checked here, before decoding
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > MAX_PIXELS:
            return "larger than 25 Mpx"
        image.load()
        factor = max(width, height) // WORK_SIDE
        if factor >= 2:
            image = image.convert("RGBA").reduce(factor)
        return image
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as error:
        return f"unreadable ({type(error).__name__})"


# --- The two data sets --------------------------------------------------------------------------------------

@dataclass
class Item:
    key: str          # stable sort key
    source: str       # what it is, for the manifest
    make: object      # () -> Image | str (the reason it is skipped)


def emoji_items(files: Files) -> tuple[dict[str, list[Item]], list[str]]:
    font_bytes = files.read(EMOJI_FONT)
    test_bytes = files.read(EMOJI_TEST)
    checked = [f"{PurePosixPath(EMOJI_FONT).name} {check_sha256(EMOJI_FONT, font_bytes, EMOJI_SHA256[EMOJI_FONT])}",
               f"{PurePosixPath(EMOJI_TEST).name} {check_sha256(EMOJI_TEST, test_bytes, EMOJI_SHA256[EMOJI_TEST])}"]
    font = ImageFont.truetype(io.BytesIO(font_bytes), 109)  # the font's one bitmap strike: 109 px

    def render(text: str) -> Image.Image | str:
        canvas = Image.new("RGBA", (400, 200), (255, 255, 255, 0))
        ImageDraw.Draw(canvas).text((200, 100), text, font=font, embedded_color=True, anchor="mm")
        box = canvas.getchannel("A").getbbox()
        if box is None:
            return "not drawn by the font"
        if box[2] - box[0] > 160:
            return "drawn as several glyphs"  # a sequence the font has no single picture for
        return canvas

    classes: dict[str, list[Item]] = {folder: [] for folder in EMOJI_GROUPS.values()}
    group = None
    for line in test_bytes.decode("utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
            continue
        if not line.strip() or line.startswith("#") or group not in EMOJI_GROUPS:
            continue
        codes, rest = line.split(";", 1)
        status, _, comment = rest.partition("#")
        if status.strip() != "fully-qualified":
            continue
        points = [int(code, 16) for code in codes.split()]
        if any(0x1F3FB <= p <= 0x1F3FF or 0x1F9B0 <= p <= 0x1F9B3 for p in points):
            continue  # skin tones, hair styles: near-copies of the base emoji
        if any(a == 0x200D and b in (0x2640, 0x2642) for a, b in zip(points, points[1:])):
            continue  # the man / woman variant of a person emoji: a near-copy
        name = comment.strip().split(" ", 2)[-1] if comment.strip() else ""
        text = "".join(map(chr, points))
        key = " ".join(f"{p:04X}" for p in points)
        classes[EMOJI_GROUPS[group]].append(Item(key, f"U+{key.replace(' ', ' U+')} {name}",
                                                 lambda text=text: render(text)))
    return classes, checked


def clipart_items(files: Files) -> tuple[dict[str, list[Item]], list[str]]:
    tree = files.tree(CLIPART_ROOT, ".png")
    listing = "".join(f"{hashlib.sha256(tree[path]).hexdigest()}  {path}\n" for path in sorted(tree))
    if len(tree) != CLIPART_FILES:
        raise DataError(f"/{CLIPART_ROOT}: {len(tree)} regular PNG files, not the pinned {CLIPART_FILES}; "
                        f"another openclipart-png version?")
    checked = [f"{len(tree)} PNG files under /{CLIPART_ROOT}, tree "
               f"{check_sha256(CLIPART_ROOT, listing.encode(), CLIPART_TREE_SHA256)}"]
    owners: dict[str, set[str]] = {}
    for path, data in tree.items():
        owners.setdefault(hashlib.sha256(data).hexdigest(), set()).add(path.split("/", 1)[0])
    classes: dict[str, list[Item]] = {name: [] for name in CLIPART_CLASSES}
    seen: set[str] = set()
    for path in sorted(tree):
        top = path.split("/", 1)[0]
        digest = hashlib.sha256(tree[path]).hexdigest()
        if top not in classes or len(owners[digest]) > 1 or digest in seen:
            continue  # another class, a drawing filed in two classes, or a byte-for-byte copy
        seen.add(digest)
        classes[top].append(Item(path, f"{CLIPART_ROOT}/{path}", lambda data=tree[path]: open_drawing(data)))
    return classes, checked


# --- Writing ------------------------------------------------------------------------------------------------

def write(name: str, out: Path, per_class: int, n_classes: int | None, size: int, seed: int, debs: list[Path],
          manifest: Path | None, root: Path = Path("/")) -> int:
    started = time.perf_counter()
    spec = DATASETS[name]
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out} is not empty: give a new folder")
    wanted = (lambda path: path in EMOJI_SHA256) if name == "noto-emoji" else \
        (lambda path: path.startswith(CLIPART_ROOT + "/") and path.endswith(".png"))
    files = Files(spec["packages"], debs, wanted, root)
    classes, checked = (emoji_items if name == "noto-emoji" else clipart_items)(files)
    names = list(classes)
    if n_classes is not None:
        if not 2 <= n_classes <= len(names):
            raise DataError(f"--classes must be 2..{len(names)} for {name}")
        names = names[:n_classes]

    written: dict[str, int] = {}
    skipped: Counter[str] = Counter()
    records = []
    pixels_seen: set[bytes] = set()
    for folder in names:
        items = sorted(classes[folder], key=lambda item: item.key)
        random.Random(f"{name}:{seed}:{folder}").shuffle(items)
        target = out / folder
        target.mkdir(parents=True, exist_ok=True)
        count = 0
        for item in items:
            if per_class and count >= per_class:
                break
            made = item.make()
            if isinstance(made, str):
                skipped[made] += 1
                continue
            image = to_square(made, size, crop_alpha=True)
            if image is None:
                skipped["blank"] += 1
                continue
            digest = hashlib.sha256(image.tobytes()).digest()
            if digest in pixels_seen:
                skipped["same pixels as one written already"] += 1
                continue
            pixels_seen.add(digest)
            file = target / f"{count:04d}.png"
            image.save(file, optimize=True)
            records.append({"file": file.relative_to(out).as_posix(), "class": folder, "source": item.source})
            count += 1
        written[folder] = count
        if count < 60:
            print(f"warning: {folder} has only {count} images", file=sys.stderr)

    if manifest is not None:
        manifest.write_text(json.dumps({"dataset": name, "source": files.origin(), "licence": spec["licence"],
                                        "seed": seed, "size": size, "per_class": per_class,
                                        "images": records}, indent=1) + "\n")
    total = sum(written.values())
    print(f"{name}: wrote {total} images in {len(written)} classes to {out} ({size}x{size} RGB PNG, seed {seed}, "
          f"{'all usable' if not per_class else f'up to {per_class}'} a class)")
    width = max(map(len, written))
    for folder, count in written.items():
        print(f"  {folder:<{width}}  {count:5d} of {len(classes[folder])} available")
    print(f"source: {files.origin()}")
    print(f"install: {spec['install']}")
    print(f"licence: {spec['licence']}")
    print("sha256 verified: " + "; ".join(checked))
    if skipped:
        print("skipped: " + ", ".join(f"{count} {why}" for why, count in skipped.most_common()))
    if manifest is not None:
        print(f"manifest: {manifest}")
    print(f"took {time.perf_counter() - started:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=sorted(DATASETS), help="the data set")
    parser.add_argument("--out", required=True, type=Path, help="the folder to write (new or empty)")
    parser.add_argument("--per-class", type=int, default=100, help="images a class, at most (0: all; default 100)")
    parser.add_argument("--classes", type=int, default=None, help="keep the first K classes (default: all)")
    parser.add_argument("--size", type=int, default=48, help="side of the square images in px (default 48)")
    parser.add_argument("--seed", type=int, default=0, help="the subset's seed (default 0)")
    parser.add_argument("--wheel", "--deb", dest="debs", action="append", type=Path, default=[],
                        help="a downloaded .deb of a package the data set needs, read in place of the installed "
                             "files (repeat for each package)")
    parser.add_argument("--root", type=Path, default=Path("/"),
                        help="where the packages' files lie when not given as .deb files: / when installed (default), "
                             "or a folder a .deb was unpacked into with dpkg-deb -x")
    parser.add_argument("--manifest", type=Path, help="also write a JSON list of every image and where it came from")
    args = parser.parse_args(argv)
    if args.per_class < 0:
        parser.error("--per-class must be 0 (all) or more")
    if not 8 <= args.size <= 256:
        parser.error("--size must be 8..256")
    try:
        return write(args.name, args.out, args.per_class, args.classes, args.size, args.seed, args.debs,
                     args.manifest, args.root)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
