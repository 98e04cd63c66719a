/*
 * errors.h - the error tokens (src/lib: no Lua).
 *
 * A failed I/O call returns `nil, token, detail`; token is one of this
 * closed set. The registry in errors.c lists each with its meaning: it is
 * what luasmtp.core.errors holds and what the README's table must match.
 */
#ifndef LS_ERRORS_H
#define LS_ERRORS_H

#include <stddef.h>

#define LS_ETIMEOUT "timeout"
#define LS_ECLOSED "closed"
#define LS_ERESET "reset"
#define LS_ETLS "tls"
#define LS_ELIMIT "limit"
#define LS_EREFUSED "refused"
#define LS_EDNS "dns"
#define LS_EUNREACH "unreachable"
#define LS_EIO "io"
#define LS_EPROTOCOL "protocol"

typedef struct ls_errtoken {
    const char *token;
    const char *meaning;
} ls_errtoken;

/* The registry: every token, once. */
extern const ls_errtoken ls_errtokens[];
extern const size_t ls_nerrtokens;

/* Map an errno value to one of the tokens. */
const char *ls_errno_token(int err);

#endif
