"""Bad input never crashes a real fedmount daemon and gets the right answer.

- Names under ``by_id/`` that are not collection ids (malformed UUIDs and PDHs, ids of
  users, groups, container requests) are ENOENT; names longer than 255 bytes are
  ENAMETOOLONG anywhere in the mount.
- File names with every character a manifest must escape (control characters, space,
  backslash, colon) and unicode are listed and read back exactly.
- A token that is wrong, malformed or unknown stops ``fedmount`` at start-up with one line
  that says so, without the secret, and nothing mounted.
- Fuzzed manifests (hypothesis), stored through the emulated controller's collection
  create (which, unlike Rails, does not validate the format: a broken or hostile cluster),
  never crash the daemon: every lookup, listing and read of them either works or fails
  with an errno, the mount keeps answering, and the log has no "Unhandled exception".
  Block tokens carry real signatures (copied from a signed manifest; the signature does
  not cover the size), so the create succeeds and the daemon really fetches them.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmount.arvados.tokens import parse_token
from integration.mounting import REPO, Mount, fedmount_cmd, is_mounted, requires_fuse, run

pytestmark = requires_fuse


def errno_of(path: Path) -> int | None:
    try:
        os.stat(path)
    except OSError as e:
        return e.errno
    return None


def test_malformed_ids_and_ids_of_other_objects_are_enoent(fed, mount):
    m = mount()
    user = fed.clusters["zzzzz"]["user_uuid"]
    names = [
        "zzzzz-4zz18-short", "zzzzz-4zz18-0123456789abcdeX", "ZZZZZ-4ZZ18-0123456789ABCDE",
        "zzzzz-4zz18-0123456789abcdef", "zzzz-4zz18-0123456789abcde", "0123456789abcdef0123456789abcdef",
        "0123456789abcdef0123456789abcdef+", "0123456789abcdef0123456789abcdef+abc",
        "0123456789ABCDEF0123456789ABCDEF+12", "0123456789abcdef0123456789abcdef+-1", "+12", "-", "...",
        " ", "\t", "a\\b", "%s%n", "zzzzz-4zz18-000000000000000\n", "über", "\x7f",
        user, "zzzzz-j7d0g-0123456789abcde", "zbbbb-xvhdp-0123456789abcde", "zcccc-7fd4e-0123456789abcde",
        "zbbbb-4zz18-aaaaaaaaaaaaaaa", "0123456789abcdef0123456789abcdef+1234",
    ]  # fmt: skip
    got = {name: errno_of(m / f"by_id/{name}") for name in names}
    assert {n: e for n, e in got.items() if e != errno.ENOENT} == {}
    assert os.listdir(m / "by_id") == ["README"]  # nothing was added
    assert m.proc.poll() is None


def test_names_longer_than_255_bytes_are_enametoolong(fed, mount):
    m = mount()
    text = fed.collections["text"]
    coll = m / f"by_id/{text['uuid']}"
    long_names = ["a" * 256, "z" * 1000, "zzzzz-4zz18-" + "a" * 300, "é" * 128]  # 'é' is two bytes
    where = [m.path, m / "by_id", coll, coll / "data"]
    got = {(str(d), len(n.encode())): errno_of(d / n) for d in where for n in long_names}
    assert {k: e for k, e in got.items() if e != errno.ENAMETOOLONG} == {}
    assert errno_of(m / ("b" * 255)) == errno.ENOENT  # 255 bytes is still a name


def test_names_with_every_escaped_character_are_listed_and_read_exactly(fed, mount):
    specials = "".join(chr(c) for c in range(1, 0x21)) + "\\:\x7f\"'*?[]{}$`!#&;|<>~%" + "ünï😀"
    files = {f"{specials}.txt": b"all of them\n", "dir\\040not-a-space/x": b"literal\n", "a b/c:d": b"cd\n"}
    files |= {f"one\\{c}" if c == "x" else f"one-{c}-{ord(c)}": f"{ord(c)}\n".encode() for c in specials}
    coll = fed.add_collection("zbbbb", f"escapes-{os.getpid()}", files)
    m = mount()
    root = m / f"by_id/{coll['uuid']}"
    listed = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    assert listed == set(files)
    assert {p: (root / p).read_bytes() for p in files} == files


@pytest.mark.parametrize(
    "token",
    ["wrong-secret", "malformed", "unknown-uuid", "other-cluster", "empty-secret"],
)
def test_invalid_or_unknown_token_stops_start_up_with_one_line(fed, tmp_path, token):
    home = parse_token(fed.token())
    bad = {
        "wrong-secret": f"v2/{home.uuid}/{'0' * 40}",
        "malformed": "v2/not-a-token",
        "unknown-uuid": f"v2/zzzzz-gj3su-{'9' * 15}/{home.secret}",  # an expired or revoked token
        "other-cluster": f"v2/zbbbb-gj3su-{'1' * 15}/{'f' * 40}",
        "empty-secret": f"v2/{home.uuid}/",
    }[token]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = fed.env()
    env["ARVADOS_API_TOKEN"] = bad
    done = run(*fedmount_cmd("--foreground", str(mnt)), env=env, cwd=REPO, check=False, timeout=60)
    assert done.returncode != 0 and not is_mounted(mnt)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "token" in lines[0].lower(), done.stderr
    assert home.secret not in done.stderr and "f" * 40 not in done.stderr


# -- fuzzed manifests ---------------------------------------------------------------------

EMPTY_HASH = "d41d8cd98f00b204e9800998ecf8427e"
_SIGNED = re.compile(r"[0-9a-f]{32}\+[0-9]+\+A[0-9a-f]+@[0-9a-f]+")


@pytest.fixture(scope="module")
def fuzz_mount(federation, tmp_path_factory):
    m = Mount(federation, tmp_path_factory.mktemp("fuzz"), "--debug")
    yield m
    m.stop()


def signed_locators(fed) -> list[str]:
    """Locators of real blocks signed for the home token (text: one small block; big: 64 MiB ones)."""
    out = []
    for name in ("text", "shared"):
        path = f"/arvados/v1/collections/{fed.collections[name]['uuid']}"
        record = fed.request(None, path, token=fed.token())
        out += _SIGNED.findall(record.json()["manifest_text"])
    return out


def manifests(locators: list[str]) -> st.SearchStrategy[str]:
    def escaped(text: str) -> str:
        return text.replace(" ", "\\040")

    def resized(loc: str, size: int) -> str:
        h, _, rest = loc.split("+", 2)
        return f"{h}+{size}+{rest}"

    locator = st.one_of(
        st.sampled_from(locators),
        st.builds(resized, st.sampled_from(locators), st.integers(0, 1 << 27)),  # a size that lies
        st.just(f"{EMPTY_HASH}+0"),
        st.sampled_from(["0123456789ABCDEF0123456789ABCDEF+3", "abc+1", "+", EMPTY_HASH]),
    )
    name = st.one_of(
        st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\n\x00"), max_size=12),
        st.sampled_from([".", "..", "a/../b", "/abs", "a//b", "\\056", "\\057", "\\", "\\0", "\\777", "x:y"]),
    )
    position = st.one_of(st.integers(0, 200), st.integers(0, 1 << 40), st.just(-1))
    file_token = st.one_of(
        st.builds(lambda p, n, nm: f"{p}:{n}:{escaped(nm)}", position, position, name),
        st.sampled_from(["0:0", "::", "1:2:3:4", "a:b:c", ""]),
    )
    stream_name = st.one_of(
        st.just("."), st.builds(lambda n: "./" + escaped(n), name), st.sampled_from(["", "x", "./"])
    )
    wild = st.builds(
        lambda s, locs, fts: " ".join([s, *locs, *fts]),
        stream_name,
        st.lists(locator, max_size=4),
        st.lists(file_token, max_size=4),
    )

    @st.composite
    def plausible(draw: st.DrawFn) -> str:
        """A well-formed stream over real blocks whose file segments mostly fit its bytes."""
        locs = draw(st.lists(st.sampled_from(locators), min_size=1, max_size=3))
        total = sum(int(loc.split("+")[1]) for loc in locs)
        spans = st.tuples(st.integers(0, total + 2), st.integers(0, total + 2), name)
        tokens = [f"{min(p, total)}:{min(n, total - min(p, total))}:{escaped(nm) or 'f'}"
                  for p, n, nm in draw(st.lists(spans, min_size=1, max_size=4))]  # fmt: skip
        return " ".join([draw(stream_name), *locs, *tokens])

    line = st.one_of(wild, plausible())
    ending = st.sampled_from(["\n", ""])
    return st.builds(lambda ls, end: "\n".join(ls) + end, st.lists(line, max_size=4), ending)


def test_fuzzed_manifests_never_crash_the_daemon(federation, fuzz_mount):
    fed, m = federation, fuzz_mount
    counter = iter(range(1 << 30))
    outcomes: dict[str, int] = {}

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(manifests(signed_locators(fed)))
    def check(manifest: str) -> None:
        body = json.dumps({"collection": {"name": f"fuzz-{os.getpid()}-{next(counter)}",
                                          "manifest_text": manifest}}).encode()  # fmt: skip
        reply = fed.request(None, "/arvados/v1/collections", method="POST", token=fed.token(), body=body,
                            headers={"Content-Type": "application/json"})  # fmt: skip
        if reply.status != 200:
            outcomes["refused by the API"] = outcomes.get("refused by the API", 0) + 1
            return
        root = m / f"by_id/{reply.json()['uuid']}"
        # every file found is read; any failure must be an errno, within a deadline
        done = subprocess.run(
            ["sh", "-c", 'find "$1" -type f -exec cat {} + > /dev/null', "fuzz", str(root)],
            capture_output=True, text=True, errors="replace", timeout=60,
        )  # fmt: skip
        outcome = "read" if done.returncode == 0 else "errno"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        assert m.proc.poll() is None, f"the daemon died on {manifest!r}"
        assert (m / "by_id/README").exists()
        assert "Unhandled exception" not in m.log.read_text(), manifest

    check()
    assert outcomes.get("read", 0) + outcomes.get("errno", 0) > 0, outcomes
    print(f"fuzzed manifests: {outcomes}")
