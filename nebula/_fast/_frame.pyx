# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""SecretConnection frame AEAD (protocol.md §6.2), compiled twin of ``frame_py.py``.

ChaCha20-Poly1305 through OpenSSL's EVP interface.  Each sealer / opener owns one
EVP_CIPHER_CTX keyed once; per frame only the 12-byte nonce is re-installed.  Frames
are built and encrypted in place inside the output ``bytes`` object, so sealing costs
one allocation per call and opening one per frame.  Behaviour (errors, counter rules,
output bytes) is identical to the pure twin.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

from nebula.errors import AuthenticationError, FrameError, ProtocolError

cdef extern from "openssl/evp.h" nogil:
    ctypedef struct EVP_CIPHER_CTX:
        pass
    ctypedef struct EVP_CIPHER:
        pass
    ctypedef struct ENGINE:
        pass
    EVP_CIPHER_CTX *EVP_CIPHER_CTX_new()
    void EVP_CIPHER_CTX_free(EVP_CIPHER_CTX *ctx)
    const EVP_CIPHER *EVP_chacha20_poly1305()
    int EVP_EncryptInit_ex(EVP_CIPHER_CTX *ctx, const EVP_CIPHER *cipher, ENGINE *impl,
                           const unsigned char *key, const unsigned char *iv)
    int EVP_DecryptInit_ex(EVP_CIPHER_CTX *ctx, const EVP_CIPHER *cipher, ENGINE *impl,
                           const unsigned char *key, const unsigned char *iv)
    int EVP_EncryptUpdate(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl,
                          const unsigned char *inp, int inl)
    int EVP_EncryptFinal_ex(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl)
    int EVP_DecryptUpdate(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl,
                          const unsigned char *inp, int inl)
    int EVP_DecryptFinal_ex(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl)
    int EVP_CipherInit_ex2(EVP_CIPHER_CTX *ctx, const EVP_CIPHER *cipher,
                           const unsigned char *key, const unsigned char *iv, int enc,
                           const OSSL_PARAM *params)
    int EVP_CIPHER_CTX_ctrl(EVP_CIPHER_CTX *ctx, int type, int arg, void *ptr)
    int EVP_CTRL_AEAD_GET_TAG

cdef extern from "openssl/params.h" nogil:
    ctypedef struct OSSL_PARAM:
        pass
    OSSL_PARAM OSSL_PARAM_construct_octet_string(const char *key, void *buf, size_t bsize)
    OSSL_PARAM OSSL_PARAM_construct_end()

cdef extern from "openssl/core_names.h" nogil:
    const char *OSSL_CIPHER_PARAM_AEAD_TAG

cdef extern from "openssl/crypto.h" nogil:
    void OPENSSL_cleanse(void *ptr, size_t len)

cdef enum:
    _DATA_MAX_SIZE = 1024
    _KEY_SIZE = 32
    _TAG_SIZE = 16
    _LENGTH_SIZE = 4
    _TOTAL_FRAME_SIZE = 1028  # length field + chunk + padding
    _SEALED_FRAME_SIZE = 1044  # + Poly1305 tag

DATA_MAX_SIZE = _DATA_MAX_SIZE
KEY_SIZE = _KEY_SIZE
SEALED_FRAME_SIZE = _SEALED_FRAME_SIZE
NONCE_LIMIT = 0xFFFFFFFFFFFFFFFF  # first counter value that is never used

cdef uint64_t _NONCE_LIMIT = 0xFFFFFFFFFFFFFFFFULL


cdef inline void _put_le32(unsigned char *p, uint32_t v) noexcept nogil:
    p[0] = <uint8_t>v
    p[1] = <uint8_t>(v >> 8)
    p[2] = <uint8_t>(v >> 16)
    p[3] = <uint8_t>(v >> 24)


cdef inline uint32_t _get_le32(const unsigned char *p) noexcept nogil:
    return <uint32_t>p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)


cdef inline void _make_nonce(unsigned char *nonce, uint64_t counter) noexcept nogil:
    cdef int i
    memset(nonce, 0, 4)
    for i in range(8):
        nonce[4 + i] = <uint8_t>(counter >> (8 * i))


cdef int _seal_frames(EVP_CIPHER_CTX *ctx, unsigned char *out, const unsigned char *src,
                      Py_ssize_t size, uint64_t *counter) noexcept nogil:
    """Seal ``size`` bytes from ``src`` as consecutive frames at ``out``; 0 on success.

    Each frame is assembled in place (length, chunk, zero padding) and encrypted there.
    The caller has checked that the counter cannot overflow.
    """
    cdef Py_ssize_t offset = 0, chunk
    cdef unsigned char nonce[12]
    cdef int outl
    while offset < size:
        chunk = size - offset
        if chunk > _DATA_MAX_SIZE:
            chunk = _DATA_MAX_SIZE
        _put_le32(out, <uint32_t>chunk)
        memcpy(out + _LENGTH_SIZE, src + offset, chunk)
        if chunk < _DATA_MAX_SIZE:
            memset(out + _LENGTH_SIZE + chunk, 0, _DATA_MAX_SIZE - chunk)
        _make_nonce(nonce, counter[0])
        if (EVP_EncryptInit_ex(ctx, NULL, NULL, NULL, nonce) != 1
                or EVP_EncryptUpdate(ctx, out, &outl, out, _TOTAL_FRAME_SIZE) != 1
                or EVP_EncryptFinal_ex(ctx, out + _TOTAL_FRAME_SIZE, &outl) != 1
                or EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, _TAG_SIZE,
                                       out + _TOTAL_FRAME_SIZE) != 1):
            return -1
        counter[0] += 1
        offset += chunk
        out += _SEALED_FRAME_SIZE
    return 0


cdef EVP_CIPHER_CTX *_new_ctx(object key, bint encrypt) except NULL:
    cdef Py_buffer view
    cdef EVP_CIPHER_CTX *ctx
    cdef int ok
    PyObject_GetBuffer(key, &view, PyBUF_SIMPLE)
    try:
        if view.len != _KEY_SIZE:
            raise ValueError(f"SecretConnection key must be {_KEY_SIZE} bytes, got {view.len}")
        ctx = EVP_CIPHER_CTX_new()
        if ctx == NULL:
            raise MemoryError("EVP_CIPHER_CTX_new failed")
        if encrypt:
            ok = EVP_EncryptInit_ex(ctx, EVP_chacha20_poly1305(), NULL,
                                    <const unsigned char *>view.buf, NULL)
        else:
            ok = EVP_DecryptInit_ex(ctx, EVP_chacha20_poly1305(), NULL,
                                    <const unsigned char *>view.buf, NULL)
        if ok != 1:
            EVP_CIPHER_CTX_free(ctx)
            raise RuntimeError("OpenSSL could not initialise ChaCha20-Poly1305")
        return ctx
    finally:
        PyBuffer_Release(&view)


cdef uint64_t _check_start(object nonce) except? 0xFFFFFFFFFFFFFFFF:
    if not 0 <= nonce <= NONCE_LIMIT:
        raise ValueError(f"nonce counter must be in [0, 2**64 - 1], got {nonce}")
    return <uint64_t>nonce


cdef class FrameSealer:
    """Seals outgoing data into 1044-byte frames with its own nonce counter."""

    cdef EVP_CIPHER_CTX *_ctx
    cdef uint64_t _nonce

    def __cinit__(self, key, nonce=0):
        self._nonce = _check_start(nonce)
        self._ctx = _new_ctx(key, True)

    def __dealloc__(self):
        if self._ctx != NULL:
            EVP_CIPHER_CTX_free(self._ctx)
            self._ctx = NULL

    @property
    def nonce(self) -> int:
        """The counter of the next frame to seal."""
        return self._nonce

    def seal(self, data) -> bytes:
        """Split ``data`` into chunks of at most 1024 bytes and seal one frame per chunk."""
        cdef Py_buffer view
        cdef Py_ssize_t size, frames
        cdef unsigned char *out
        cdef const unsigned char *src
        cdef int failed
        cdef bytes result
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            size = view.len
            if size == 0:
                return b""
            frames = (size + _DATA_MAX_SIZE - 1) // _DATA_MAX_SIZE
            if <uint64_t>frames > _NONCE_LIMIT - self._nonce:
                raise ProtocolError(
                    "SecretConnection send nonce exhausted; the connection must close"
                )
            result = PyBytes_FromStringAndSize(NULL, frames * _SEALED_FRAME_SIZE)
            out = <unsigned char *>PyBytes_AS_STRING(result)
            src = <const unsigned char *>view.buf
            failed = _seal_frames(self._ctx, out, src, size, &self._nonce)
            if failed:
                raise RuntimeError("OpenSSL ChaCha20-Poly1305 encryption failed")
            return result
        finally:
            PyBuffer_Release(&view)


cdef class FrameOpener:
    """Opens incoming 1044-byte frames with its own nonce counter."""

    cdef EVP_CIPHER_CTX *_ctx
    cdef uint64_t _nonce

    def __cinit__(self, key, nonce=0):
        self._nonce = _check_start(nonce)
        self._ctx = _new_ctx(key, False)

    def __dealloc__(self):
        if self._ctx != NULL:
            EVP_CIPHER_CTX_free(self._ctx)
            self._ctx = NULL

    @property
    def nonce(self) -> int:
        """The counter of the next frame to open."""
        return self._nonce

    def open(self, frame) -> bytes:
        """Authenticate and decrypt one sealed frame; return its chunk.

        A frame that fails authentication leaves the counter where it was; a frame that
        authenticates consumes its counter even if its length field is then refused.
        """
        cdef Py_buffer view
        cdef const unsigned char *src
        cdef unsigned char plaintext[_TOTAL_FRAME_SIZE]
        cdef unsigned char nonce[12]
        cdef OSSL_PARAM params[2]
        cdef int outl, ok
        cdef uint32_t length
        PyObject_GetBuffer(frame, &view, PyBUF_SIMPLE)
        try:
            if view.len != _SEALED_FRAME_SIZE:
                raise FrameError(
                    f"sealed SecretConnection frame must be {_SEALED_FRAME_SIZE} bytes, "
                    f"got {view.len}"
                )
            if self._nonce >= _NONCE_LIMIT:
                raise ProtocolError(
                    "SecretConnection receive nonce exhausted; the connection must close"
                )
            src = <const unsigned char *>view.buf
            _make_nonce(nonce, self._nonce)
            # The expected tag goes in with the nonce: one provider call instead of two.
            params[0] = OSSL_PARAM_construct_octet_string(
                OSSL_CIPHER_PARAM_AEAD_TAG, <void *>(src + _TOTAL_FRAME_SIZE), _TAG_SIZE
            )
            params[1] = OSSL_PARAM_construct_end()
            if (EVP_CipherInit_ex2(self._ctx, NULL, NULL, nonce, 0, params) != 1
                    or EVP_DecryptUpdate(self._ctx, plaintext, &outl, src,
                                         _TOTAL_FRAME_SIZE) != 1):
                raise RuntimeError("OpenSSL ChaCha20-Poly1305 decryption failed")
            ok = EVP_DecryptFinal_ex(self._ctx, plaintext, &outl)  # AEAD: writes nothing
            if ok != 1:
                OPENSSL_cleanse(plaintext, _TOTAL_FRAME_SIZE)
                raise AuthenticationError(
                    f"failed to decrypt SecretConnection frame {self._nonce} (wrong MAC)"
                )
            self._nonce += 1
            length = _get_le32(plaintext)
            if length > _DATA_MAX_SIZE:
                raise FrameError(
                    f"SecretConnection chunk length {length} is greater than {_DATA_MAX_SIZE}"
                )
            return PyBytes_FromStringAndSize(<char *>plaintext + _LENGTH_SIZE, length)
        finally:
            PyBuffer_Release(&view)
