"""The one exception type users see.

Every failure that is the user's to fix (a bad recipe key, a missing tensor, a shape mismatch) is raised
as :class:`GiftMergeError` with a message that names the file, YAML key or tensor. The CLI turns it into
one line on stderr and exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class GiftMergeError(Exception):
    """A problem with the user's input, described in one line."""
