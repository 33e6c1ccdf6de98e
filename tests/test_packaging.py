"""What ships, what a test run leaves behind, and the user docs.

The wheel: an editable install reads every file from the source tree, so only a built wheel
shows whether the Lua scripts, ``py.typed`` and the demo's data files ship. The wheel is
built once per session from a copy of the tree (a stale ``build/`` would hide a file that
package data misses).

The run's Redis keys: a test session deletes everything it wrote to the shared Redis, and
nothing that other runs wrote.

The docs: README.md and docs/ link only files of the repository, and every docs page.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import uuid
import zipfile
from pathlib import Path

import pytest
import redis

from tests.conftest import require_redis
from tests.helpers import ROOT, RUN_PREFIX, Uvicorn, check_run_prefixes, unique_prefix

PACKAGES = ("ymguard", "demo_service")


def _tree_files() -> list[str]:
    """The project's files as a user's checkout has them: tracked or new, never ignored."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout.decode()
        names = [name for name in listed.split("\0") if name]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: walk the tree
        names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file()]
    return sorted(
        name
        for name in names
        if (ROOT / name).is_file()  # a file deleted but not yet committed is listed too
        and "__pycache__" not in name
        and not name.endswith((".pyc", ".pyo"))
        and ".egg-info" not in name
    )


def _package_files() -> list[str]:
    """Every file of the installable packages: the modules and every data file they read."""
    return [name for name in _tree_files() if name.split("/", 1)[0] in PACKAGES]


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built by pip, as a user would, from a fresh copy of the tree."""
    source = tmp_path_factory.mktemp("source")
    for name in _tree_files():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    out = tmp_path_factory.mktemp("dist")
    try:
        built = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)],
            capture_output=True,
            text=True,
            timeout=600,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("pip wheel did not finish in 600 s")
    if built.returncode != 0:
        pytest.fail(f"pip wheel failed:\n{built.stdout}\n{built.stderr}")
    (path,) = out.glob("ymguard-*.whl")
    return path


def test_the_wheel_ships_every_file_of_the_packages(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        shipped = set(archive.namelist())
    expected = _package_files()
    # The kinds of data file that must never go missing are there to be checked at all.
    assert any(name.startswith("ymguard/backends/") and name.endswith(".lua") for name in expected)
    assert "ymguard/py.typed" in expected and "demo_service/rules.yaml" in expected
    missing = [name for name in expected if name not in shipped]
    assert missing == [], f"files of the packages that the wheel does not ship: {missing}"


def test_the_wheel_ships_no_tests_and_no_tree_outside_the_packages(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        tops = {name.split("/", 1)[0] for name in archive.namelist()}
    (metadata,) = tops - set(PACKAGES)
    assert tops == {*PACKAGES, metadata} and metadata.endswith(".dist-info")


def test_the_wheel_runs_every_rule_kind_on_redis_outside_the_source_tree(
    wheel: Path, tmp_path: Path
) -> None:
    """``.ci/wheel_smoke.py`` against the unpacked wheel, from a directory outside the tree."""
    redis_url = require_redis()
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    work = tmp_path / "elsewhere"
    work.mkdir()
    # PYTHONPATH comes before the editable install's finder, so the unpacked wheel is what
    # imports; the script itself refuses a ymguard imported from the tree.
    env = {**os.environ, "PYTHONPATH": str(site), "YMGUARD_TEST_PREFIX": unique_prefix()}
    env.pop("YMGUARD_STORAGE", None)
    try:
        smoke = subprocess.run(
            [sys.executable, str(ROOT / ".ci" / "wheel_smoke.py"), redis_url],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the wheel smoke test did not finish in 120 s")
    assert smoke.returncode == 0, smoke.stdout + smoke.stderr
    assert f"imported from the installed package ({site / 'ymguard'})" in smoke.stdout
    assert smoke.stdout.rstrip().endswith("wheel smoke: ok")


# -- the run's keys on the shared Redis --------------------------------------------------


def test_every_prefix_of_the_run_is_inside_the_runs_namespace() -> None:
    prefixes = {unique_prefix() for _ in range(100)}
    assert len(prefixes) == 100
    assert all(p.startswith(RUN_PREFIX) for p in prefixes)
    assert RUN_PREFIX.startswith("ymt-") and RUN_PREFIX.endswith("-")
    # Hash tags and globs: a prefix must not carry either.
    assert not set("{}*?[]\\") & set("".join(prefixes))


def test_apps_started_as_subprocesses_take_their_prefix_from_the_run() -> None:
    check_run_prefixes({"YMGUARD_TEST_PREFIX": unique_prefix(), "YMGUARD_TEST_REDIS": "redis://"})
    # Refused before anything starts: what the process wrote would outlive the run.
    for name in ("YMGUARD_TEST_PREFIX", "SEM_TEST_PREFIX", "ANTIRESUBMIT_PREFIX"):
        with pytest.raises(ValueError, match="outside this test run's namespace"):
            Uvicorn("tests.apps.flow_app:app", env={name: "ymt-0123456789ab"})


def test_a_test_session_deletes_its_keys_and_no_other_runs(tmp_path: Path) -> None:
    """A real pytest session writes keys without TTL; when it ends they are gone, others stay."""
    redis_url = require_redis()
    client = redis.Redis.from_url(redis_url)
    # Another run's namespace, and the flat prefixes older runs used: never ours to delete.
    others = [
        f"ymt-{uuid.uuid4().hex[:8]}-{uuid.uuid4().hex[:12]}:x",
        f"ymt-{uuid.uuid4().hex[:12]}:x",
    ]
    for key in others:
        client.set(key, "other run")
    inner = tmp_path / "test_inner.py"
    inner.write_text(
        textwrap.dedent(
            """
            import os
            import redis
            from tests.helpers import RUN_PREFIX, SHARED_REDIS_URL, count_run_keys, unique_prefix

            def test_writes_keys_without_ttl():
                client = redis.Redis.from_url(SHARED_REDIS_URL)
                for i in range(25):
                    client.set(unique_prefix() + ":{sem:s}:permits", i)
                client.hset(unique_prefix() + ":peak", "n", 1)
                assert count_run_keys() == 26
                with open(os.environ["INNER_RUN_PREFIX_FILE"], "w") as f:
                    f.write(RUN_PREFIX)
            """
        )
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "YMGUARD_TEST_REDIS": redis_url,
        "INNER_RUN_PREFIX_FILE": str(tmp_path / "run_prefix"),
    }
    plugins = ["-p", "tests.conftest", "-p", "no:cacheprovider"]
    try:
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                *plugins,
                "--rootdir",
                str(tmp_path),
                str(inner),
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the inner pytest session did not finish in 120 s")
    try:
        assert run.returncode == 0, run.stdout + run.stderr
        inner_prefix = (tmp_path / "run_prefix").read_text()
        assert inner_prefix != RUN_PREFIX and inner_prefix.startswith("ymt-")
        assert list(client.scan_iter(match=inner_prefix + "*")) == []
        assert [client.get(key) for key in others] == [b"other run", b"other run"]
    finally:
        client.delete(*others)
        client.close()


# -- the user docs ------------------------------------------------------------------------

_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _doc_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _relative_links(page: Path) -> list[tuple[str, Path]]:
    """Each link of a page to a file (not a URL, not an anchor), resolved from the page."""
    links = []
    for target in _LINK.findall(page.read_text(encoding="utf-8")):
        if "://" in target or target.startswith(("#", "mailto:")):
            continue
        links.append((target, (page.parent / target.split("#", 1)[0]).resolve()))
    return links


def test_readme_and_docs_link_nothing_outside_the_repository() -> None:
    outside = [
        f"{page.relative_to(ROOT)}: {target}"
        for page in _doc_pages()
        for target, path in _relative_links(page)
        if not path.is_relative_to(ROOT)
    ]
    assert outside == []


def test_links_of_readme_and_docs_reach_files_of_the_repository() -> None:
    broken = [
        f"{page.relative_to(ROOT)}: {target}"
        for page in _doc_pages()
        for target, path in _relative_links(page)
        if path.is_relative_to(ROOT) and not path.exists()
    ]
    assert broken == []


def test_the_docs_index_and_the_readme_link_every_docs_page() -> None:
    pages = {"problems.md", "rules.md", "scopes.md", "storage.md"}
    pages |= {p.name for p in (ROOT / "docs").glob("*.md")}
    pages.discard("README.md")
    index = {path.name for _, path in _relative_links(ROOT / "docs" / "README.md")}
    readme = {path.name for _, path in _relative_links(ROOT / "README.md")}
    assert pages - index == set()
    assert pages - readme == set()
