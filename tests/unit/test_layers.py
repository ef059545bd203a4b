"""Imports go downward only (DESIGN.md, Layers): checked on the source, as s3ql does."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def files(sub: str) -> list[pathlib.Path]:
    p = ROOT / sub
    found = [p] if p.is_file() else sorted(p.rglob("*.py"))
    assert found, f"no sources under {sub}"
    return found


def offending(sub: str, banned) -> list[str]:
    bad = []
    for f in files(sub):
        for name in imports(f):
            if banned(name):
                bad.append(f"{f.relative_to(ROOT)} imports {name}")
    return bad


def test_engine_knows_no_fuse_and_no_trio():
    assert offending("snapfs/chain", lambda n: n.split(".")[0] in ("pyfuse3", "trio")
                     or n.startswith("snapfs.fs") or n.startswith("snapfs.mount")) == []


def test_fuse_layer_does_not_parse_qcow2():
    assert offending("snapfs/fs", lambda n: n.startswith(("snapfs.chain.format",
                                                          "snapfs.chain.qcow2",
                                                          "snapfs.chain.refcount"))) == []


def test_driver_uses_only_the_control_protocol():
    """The driver reaches snapfs through the control files and the mount layout that every
    host shares (snapfs.attach), never through the engine."""
    assert offending("cinder_driver", lambda n: n.startswith("snapfs.")
                     and not n.startswith(("snapfs.ctl", "snapfs.attach"))) == []


def test_attach_helper_needs_no_engine():
    """Compute hosts run snapfs.attach: plain mounts, no engine, no FUSE, no Cinder."""
    assert offending("snapfs/attach.py", lambda n: n.startswith(("snapfs.", "cinder",
                                                                  "pyfuse3", "trio"))) == []
