"""Stage-out: put result files into a named resource of a scan (or an assessor), verified.

The whole upload is planned before the first byte is sent: XNAT's listing of the target
resource is read, every local file XNAT already has is hashed, and an existing file with
different content is an error (unless ``overwrite``) before anything changes. Identical files
are skipped. New files are hashed while they are sent, so each is read once. Uploads stream file
objects with ``inbody=true`` (never a multipart body built in memory); many small files go up
as one zip with ``extract=true``. XNAT answers 200 both when it keeps an old file (a
``duplicates`` list) and, for a user without write rights, when it stores nothing, so only the
re-listing afterwards proves an upload: every file is checked by name, size and digest.
The package: ``refuse`` (what may be read: no links, special files or secrets), ``local``
(the files to send) and ``upload`` (the target, the requests and the verification).
"""

from __future__ import annotations

from .local import SAFE_PATH, LocalFile, collect
from .refuse import (
    UPLOAD,
    RefusedFileError,
    Secrets,
    check_file,
    kind_of,
    link_refusal,
    open_folder,
    open_regular,
    open_subfolder,
    read_link,
    refusal,
    replaced,
    secret_ids,
    shown,
    subfolder,
)
from .upload import (
    StageOutReport,
    Target,
    default_labels,
    remote_files,
    resolve_target,
    stage_out,
)

__all__ = [
    "SAFE_PATH",
    "UPLOAD",
    "LocalFile",
    "RefusedFileError",
    "Secrets",
    "StageOutReport",
    "Target",
    "check_file",
    "collect",
    "default_labels",
    "kind_of",
    "link_refusal",
    "open_folder",
    "open_regular",
    "open_subfolder",
    "read_link",
    "refusal",
    "remote_files",
    "replaced",
    "resolve_target",
    "secret_ids",
    "shown",
    "stage_out",
    "subfolder",
]
