/*
 * errors.c - the registry of error tokens (see errors.h). Plain C.
 */
#include <errno.h>

#include "errors.h"

const ls_errtoken ls_errtokens[] = {
    {LS_ETIMEOUT, "a deadline passed; after a read timeout the socket stays usable"},
    {LS_ECLOSED, "the peer closed the connection, or the object was closed"},
    {LS_ERESET, "the connection was reset (ECONNRESET, EPIPE)"},
    {LS_ETLS, "the TLS handshake or a TLS record failed, or the peer's certificate was refused"},
    {LS_ELIMIT, "a size or count limit was reached (line or message too long, out of memory)"},
    {LS_EREFUSED, "the connection was refused"},
    {LS_EDNS, "name resolution failed"},
    {LS_EUNREACH, "the network or host is unreachable"},
    {LS_EIO, "any other system error; the detail names it"},
    {LS_EPROTOCOL, "the peer broke the SMTP (or HTTP) grammar"},
};

const size_t ls_nerrtokens = sizeof ls_errtokens / sizeof ls_errtokens[0];

const char *ls_errno_token(int err)
{
    switch (err) {
    case ETIMEDOUT:
        return LS_ETIMEOUT;
    case ECONNRESET:
    case EPIPE:
    case ECONNABORTED:
        return LS_ERESET;
    case ECONNREFUSED:
        return LS_EREFUSED;
    case ENETUNREACH:
    case EHOSTUNREACH:
    case ENETDOWN:
    case EHOSTDOWN:
    case EADDRNOTAVAIL:
        return LS_EUNREACH;
    default:
        return LS_EIO;
    }
}
