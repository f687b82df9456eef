"""Nodes: write a filesystem as a tree of objects; the bridge does the kernel's bookkeeping.

``afuse.mount(NodeFS(Dir({"hello.txt": b"Hello\\n"})), "/mnt/x")`` mounts a one-file
filesystem. See docs/nodes.md.
"""

from .bridge import NodeFS
from .caller import Caller, current_caller
from .loopback import LoopbackFS, LoopbackHandle, LoopbackNode, loopback
from .node import DirItem, FDHandle, FileHandle, Node
from .values import Dir, MemDir, MemFile, StaticFile, Symlink, Tree, node_from

__all__ = ["Caller", "Dir", "DirItem", "FDHandle", "FileHandle", "LoopbackFS", "LoopbackHandle", "LoopbackNode",
           "MemDir", "MemFile", "Node", "NodeFS", "StaticFile", "Symlink", "Tree", "current_caller", "loopback",
           "node_from"]
