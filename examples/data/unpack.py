"""Unpack exllamav2's `standard_cal_data` text files from its wheel (a zip archive) into a
folder: `python unpack.py WHEEL FOLDER`. Only the `.utf8` files of that one folder are read,
each written under its own base name, so a damaged or hostile archive cannot write elsewhere.
The files go to a staging folder renamed into place at the end: FOLDER is complete or absent.
"""

import shutil
import sys
import zipfile
from pathlib import Path, PurePosixPath

MEMBERS = PurePosixPath("exllamav2/conversion/standard_cal_data")
MAX_BYTES = 16 * 2**20  # the six files are 3.3 MB together


def unpack(wheel: Path, folder: Path) -> list[Path]:
    if folder.exists():
        raise SystemExit(f"{folder} exists: remove it to unpack again")
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    written = []
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            path = PurePosixPath(info.filename)
            if path.parent != MEMBERS or path.suffix != ".utf8" or info.file_size > MAX_BYTES:
                continue
            (staging / path.name).write_bytes(archive.read(info))
            written.append(folder / path.name)
    if len(written) != 6:
        raise SystemExit(f"{wheel}: expected 6 text files in {MEMBERS}, found {len(written)}")
    staging.rename(folder)
    return written


if __name__ == "__main__":
    for path in unpack(Path(sys.argv[1]), Path(sys.argv[2])):
        print(path)
