"""data_auth_results: an incoming Authentication-Results header that claims our
authserv-id (``smtp.hostname``) is forged, whoever added it: it is removed when the
message is queued (RFC 8601 5), so that nothing behind us trusts it."""

from __future__ import annotations

from mailbox_guard.model import Context, HeaderRemoval, Mode, Phase, Result

NAME = "data_auth_results"


class ForgedAuthResults:
    name = NAME
    phases = frozenset({Phase.DATA})
    timeout = None          # reads the parsed headers only
    gate = False
    default_mode = Mode.ENFORCE
    fixed_mode = False
    description = "Incoming Authentication-Results claiming our authserv-id are removed."

    async def run(self, ctx: Context) -> list[Result]:
        headers = ctx.transaction.headers
        found = headers.get_all("Authentication-Results") if headers is not None else None
        if not found:
            return []
        ours = ctx.policy.settings["smtp.hostname"].lower()
        forged = [v for v in found if _authserv_id(str(v)) == ours]
        if not forged:
            return []
        return [Result(NAME, "FORGED_AUTH_RESULTS", detail=f"{len(forged)} header(s) claiming {ours}",
                       remove_headers=(HeaderRemoval("Authentication-Results", ours),))]


def _authserv_id(value: str) -> str:
    """The authserv-id of an Authentication-Results value (before ';' and any version)."""
    head = " ".join(value.split()).partition(";")[0].strip()
    return head.split(" ")[0].lower() if head else ""
