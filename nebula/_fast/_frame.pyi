"""Type stub for the compiled SecretConnection frame kernel (twin: frame_py)."""

from typing import TypeAlias

Buffer: TypeAlias = bytes | bytearray | memoryview

DATA_MAX_SIZE: int
KEY_SIZE: int
SEALED_FRAME_SIZE: int
NONCE_LIMIT: int

class FrameSealer:
    def __init__(self, key: Buffer, nonce: int = 0) -> None: ...
    @property
    def nonce(self) -> int: ...
    def seal(self, data: Buffer) -> bytes: ...

class FrameOpener:
    def __init__(self, key: Buffer, nonce: int = 0) -> None: ...
    @property
    def nonce(self) -> int: ...
    def open(self, frame: Buffer) -> bytes: ...
