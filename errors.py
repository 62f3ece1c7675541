"""The one base of the errors a user can fix; light, so that every stage and the command line share it.

An error of this kind is a problem with the user's inputs or machine (a bad manifest, missing
weights, a damaged shard, a folder that is not a run...): its message says what is wrong, names
the file and the fix, and `cli.py` shows it without a traceback and exits 1. Anything else
raised is a bug in this program.
"""


class UserError(Exception):
    """A problem the user can fix; the message names the file and the fix."""
