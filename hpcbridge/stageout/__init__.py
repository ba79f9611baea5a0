"""Stage-out: put result files into a named resource of a scan (or an assessor), verified.

The whole upload is planned before the first byte is sent: XNAT's listing of the target
resource is read, every local file XNAT already has is hashed, and an existing file with
different content is an error (unless ``overwrite``) before anything changes. Identical files
are skipped. New files are hashed while they are sent, so each is read once. Uploads stream file
objects with ``inbody=true`` (never a multipart body built in memory); many small files go up
as one zip with ``extract=true``. XNAT answers 200 both when it keeps an old file (a
``duplicates`` list) and, for a user without write rights, when it stores nothing, so only the
re-listing afterwards proves an upload: every file is checked by name, size and digest.

The package: ``files`` (what may be read: no links, special files or secrets; the files to
send) and ``upload`` (the target, the requests and the verification).
"""

from __future__ import annotations

# The names used outside the package.
from .files import RefusedFileError, collect, kind_of, link_refusal, refusal, replaced  # noqa: F401
from .upload import resolve_target, stage_out  # noqa: F401
