"""An SFTP server that answers every READ with at most 10,000 bytes (as servers may: older
OpenSSH read at most 64 KiB), for tests/test_sftpfs.py. asyncssh's SSH and SFTP server, on
127.0.0.1, a free port; keys in the directory given. Prints the port, then serves until killed.

    python tests/short_read_sftp_server.py DIR
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import asyncssh

LIMIT = 10_000


class ShortReads(asyncssh.SFTPServer):
    def read(self, file_obj: Any, offset: int, size: int) -> Any:
        return super().read(file_obj, offset, min(size, LIMIT))


async def main(d: Path) -> None:
    host = asyncssh.generate_private_key("ssh-ed25519")
    user = asyncssh.generate_private_key("ssh-ed25519")
    user.write_private_key(str(d / "id_ed25519"))
    (d / "id_ed25519").chmod(0o600)
    server = await asyncssh.listen("127.0.0.1", 0, server_host_keys=[host],
                                   authorized_client_keys=asyncssh.import_authorized_keys(
                                       user.export_public_key().decode()),
                                   sftp_factory=ShortReads, allow_scp=False)
    port = server.sockets[0].getsockname()[1]
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host.export_public_key().decode()}")
    print(port, flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
