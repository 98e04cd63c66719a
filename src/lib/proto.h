/*
 * proto.h - SMTP protocol codecs: pure C, no Lua, no I/O, no allocation.
 *
 * Every function takes plain bytes and fills plain structs; these are the
 * functions the fuzzers in fuzz/ drive. Pointers returned inside a result
 * (spans) point into the caller's input and live as long as it does.
 *
 *   commands      smtp_parse_command: verb, MAIL/RCPT paths and ESMTP
 *                 parameters (RFC 5321 4.1.2, 3461, 6152, 3030, 6531,
 *                 1870, 4954, 8689), EHLO/HELO domain, BDAT, AUTH
 *   DATA          smtp_data_decoder: streaming CRLF.CRLF detection,
 *                 dot-unstuffing, size limit, bare CR/LF detection
 *   dot-stuffing  smtp_data_encoder: the client side of DATA
 *   replies       smtp_parse_reply_line, smtp_reply_parser (multi-line),
 *                 smtp_format_reply (server side, injection-safe)
 *   PROXY         smtp_parse_proxy: HAProxy PROXY protocol v1 and v2
 *   xtext         smtp_xtext_encode / smtp_xtext_decode (RFC 3461)
 *   EHLO          smtp_parse_ehlo_line: keyword and parameters
 */
#ifndef LUASMTP_PROTO_H
#define LUASMTP_PROTO_H

#include <stddef.h>
#include <stdint.h>

/* ------------------------------------------------------------------ */
/* Limits (octets unless said otherwise) */

#define SMTP_MAX_COMMAND 16384   /* longest command line parsed at all */
#define SMTP_MAX_LOCAL 64        /* local part (RFC 5321 4.5.3.1.1) */
#define SMTP_MAX_DOMAIN 255      /* domain or address literal */
#define SMTP_MAX_LABEL 63        /* one domain label */
#define SMTP_MAX_PATH 256        /* "<...>" including brackets and route */
#define SMTP_MAX_PARAMS 16       /* ESMTP parameters on one MAIL/RCPT */
#define SMTP_MAX_KEYWORD 64      /* ESMTP parameter keyword */
#define SMTP_MAX_PARAM_VALUE 1600 /* one value as written: ORCPT of 500, escaped */
#define SMTP_MAX_ENVID 100       /* ENVID as written (RFC 3461 4.4) */
#define SMTP_MAX_ORCPT 500       /* ORCPT address once decoded (RFC 3461 4.2) */
#define SMTP_MAX_ADDR_TYPE 32    /* ORCPT addr-type */
#define SMTP_MAX_AUTH_PARAM 500  /* MAIL AUTH= mailbox once decoded */
#define SMTP_MAX_MECH 20         /* SASL mechanism name (RFC 4422) */
#define SMTP_MAX_BDAT_CHUNK ((UINT64_C(1) << 53) - 1)
#define SMTP_MAX_REPLY_LINE 512  /* formatted reply line, CRLF included */
#define SMTP_PROXY_V1_MAX 107    /* PROXY v1 line, CRLF included */
#define SMTP_PROXY_V2_MAX 4096   /* PROXY v2 payload (length field) */
#define SMTP_EHLO_MAX_PARAMS 64  /* parameters on one EHLO line */

/* ------------------------------------------------------------------ */
/* Commands */

enum smtp_verb {
    SMTP_UNKNOWN = 0,
    SMTP_EHLO,
    SMTP_HELO,
    SMTP_LHLO,
    SMTP_MAIL,
    SMTP_RCPT,
    SMTP_DATA,
    SMTP_BDAT,
    SMTP_RSET,
    SMTP_NOOP,
    SMTP_QUIT,
    SMTP_VRFY,
    SMTP_EXPN,
    SMTP_HELP,
    SMTP_STARTTLS,
    SMTP_AUTH,
    SMTP_VERB_COUNT
};

/* Upper-case name of a verb ("UNKNOWN" for SMTP_UNKNOWN). */
const char *smtp_verb_name(enum smtp_verb v);

enum smtp_status {
    SMTP_OK = 0,
    SMTP_E_LINE,   /* 500 5.5.2: empty, too long, control characters */
    SMTP_E_SYNTAX, /* 501 5.5.4: arguments malformed */
    SMTP_E_PATH,   /* 501 5.1.7 (MAIL) / 5.1.3 (RCPT): bad address */
    SMTP_E_PARAM,  /* 501 5.5.4: bad, conflicting repeated or too many parameters */
    SMTP_E_UTF8,   /* 553 5.6.7: non-ASCII address without SMTPUTF8 */
};

/* The reply a server should give for a status (static strings). For
 * SMTP_OK with verb SMTP_UNKNOWN it holds 500 5.5.2 "command not
 * recognized"; for SMTP_OK otherwise code is 0. */
struct smtp_reason {
    int code;
    const char *enhanced;
    const char *text;
};

enum smtp_pkey {
    SMTP_P_OTHER = 0,
    SMTP_P_SIZE,
    SMTP_P_BODY,
    SMTP_P_SMTPUTF8,
    SMTP_P_RET,
    SMTP_P_ENVID,
    SMTP_P_NOTIFY,
    SMTP_P_ORCPT,
    SMTP_P_AUTH,
    SMTP_P_REQUIRETLS,
};

struct smtp_param {
    const char *name;  /* keyword as written */
    size_t name_len;
    const char *value; /* raw value as written; NULL when no "=" */
    size_t value_len;
    enum smtp_pkey key;
    int unknown;       /* not known, or not valid for this verb: 555 */
};

enum smtp_body { SMTP_BODY_NONE = 0, SMTP_BODY_7BIT, SMTP_BODY_8BITMIME, SMTP_BODY_BINARYMIME };
enum smtp_ret { SMTP_RET_NONE = 0, SMTP_RET_FULL, SMTP_RET_HDRS };

#define SMTP_NOTIFY_NEVER 1u
#define SMTP_NOTIFY_SUCCESS 2u
#define SMTP_NOTIFY_FAILURE 4u
#define SMTP_NOTIFY_DELAY 8u

/* A reverse- or forward-path, source route dropped. addr holds
 * local "@" domain as written (a quoted local part keeps its quotes),
 * "" for the null path <>, "Postmaster" (as written) for <Postmaster>. */
struct smtp_path {
    size_t len;
    size_t local_len;  /* local part = addr[0, local_len) */
    size_t domain_off; /* domain = addr[domain_off, len); == len if none */
    int null;          /* <> */
    int postmaster;    /* <Postmaster> without a domain (RCPT only) */
    int utf8;          /* non-ASCII octets in the local part or domain */
    int literal;       /* domain is an address literal [...] */
    int quoted;        /* local part is a quoted string */
    int route;         /* a source route was given (and dropped) */
    char addr[SMTP_MAX_PATH + 1]; /* NUL-terminated; last: not zeroed */
};

/* Decoded values of the known MAIL/RCPT parameters. The text buffers
 * come last and are valid (NUL-terminated) only when their has_ flag is
 * set: the parser does not clear them. */
struct smtp_mailparams {
    int has_size;
    uint64_t size; /* saturates at UINT64_MAX */
    enum smtp_body body;
    int smtputf8;
    enum smtp_ret ret;
    unsigned notify; /* SMTP_NOTIFY_* bits, 0 when absent */
    int requiretls;
    int has_envid;
    size_t envid_len;
    int has_orcpt;
    size_t orcpt_type_len;
    size_t orcpt_len;
    int has_auth;
    int auth_null; /* AUTH=<> */
    size_t auth_len;
    char envid[SMTP_MAX_ENVID + 1]; /* xtext-decoded */
    char orcpt_type[SMTP_MAX_ADDR_TYPE + 1];
    char orcpt[SMTP_MAX_ORCPT + 1]; /* xtext-decoded */
    char auth[SMTP_MAX_AUTH_PARAM + 1]; /* xtext-decoded */
};

struct smtp_cmd {
    enum smtp_verb verb;
    const char *word; /* the verb as written */
    size_t word_len;
    const char *arg;  /* everything after the verb and its space */
    size_t arg_len;
    struct smtp_reason err;

    /* MAIL / RCPT (path, mp and params: see the end) */
    size_t nparams;
    size_t nunknown; /* parameters to answer 555 for */

    /* EHLO / HELO / LHLO: span into the line */
    const char *domain;
    size_t domain_len;
    int domain_literal;

    /* BDAT */
    uint64_t chunk_size;
    int last;

    /* AUTH */
    const char *mech;
    size_t mech_len;
    const char *initial; /* NULL when absent; "=" is an empty response */
    size_t initial_len;

    /* MAIL / RCPT; the large members last, cleared only in part */
    struct smtp_path path;
    struct smtp_mailparams mp;
    /* [0, nparams), one per keyword: a keyword repeated with the same
     * value (or a flag repeated) is kept once, a repeat with another
     * value is SMTP_E_PARAM */
    struct smtp_param params[SMTP_MAX_PARAMS];
};

struct smtp_cmd_opts {
    int utf8;         /* SMTPUTF8 in effect: the transaction's MAIL had
                         SMTPUTF8 (RCPT paths may be non-ASCII), or the
                         server offers it (EHLO U-labels). MAIL ignores it:
                         only its own SMTPUTF8 parameter allows UTF-8 */
    int strict_space; /* refuse "MAIL FROM: <a@b>" (spaces after the
                         colon, accepted by default) */
    size_t max_params; /* 0: SMTP_MAX_PARAMS; larger values are clamped */
};

/* Parse one command line, without its CRLF. Unknown verbs are not an
 * error: verb is SMTP_UNKNOWN and err says 500 5.5.2. On failure, out->err
 * holds the reply to give. opts may be NULL (defaults). */
enum smtp_status smtp_parse_command_ex(const char *line, size_t len,
                                       const struct smtp_cmd_opts *opts,
                                       struct smtp_cmd *out);
enum smtp_status smtp_parse_command(const char *line, size_t len, struct smtp_cmd *out);

/* Validate a domain or address literal (EHLO argument): 0 if valid,
 * *literal set when it is [...]; allow_utf8: accept U-labels. */
int smtp_check_domain(const char *p, size_t len, int allow_utf8, int *literal);

/* ------------------------------------------------------------------ */
/* Output callback of the streaming codecs: return 0, or non-zero to stop
 * (the codec then reports failure and consumes nothing more). */
typedef int (*smtp_out_fn)(void *ctx, const char *p, size_t n);

/* ------------------------------------------------------------------ */
/* DATA decoder (server side).
 *
 * Fed the bytes that follow the CRLF of the DATA command, in chunks split
 * anywhere. The message ends at the first CRLF "." CRLF of the stream
 * (with the DATA command's own CRLF in front, so ".\r\n" at once is an
 * empty message); bare LF and bare CR never end a line, so "\n.\n",
 * "\r.\r", "\r\n.\n" and "\n.\r\n" do not end the message (SMTP smuggling,
 * CVE-2023-51764/51765/51766). A "." that starts a line (after CRLF) and
 * is not the terminator is removed (dot-unstuffing).
 *
 * Bare CR / bare LF: always flagged. SMTP_BARE_REJECT passes them through
 * unchanged and the caller must refuse the message (result: rejected);
 * SMTP_BARE_NORMALISE writes each as CRLF. A "." after a bare line ending
 * is not a line start and is kept.
 *
 * size counts decoded bytes, past the limit too; beyond max_size nothing
 * more is written to the output, too_big is set, and the input is still
 * consumed until the end. long_line: a decoded line (between CRLFs) over
 * max_line bytes, CRLF excluded (RFC 5321: 998). */
enum smtp_bare_mode { SMTP_BARE_REJECT = 0, SMTP_BARE_NORMALISE = 1 };

struct smtp_data_decoder {
    uint64_t max_size; /* 0: no limit */
    size_t max_line;   /* 0: no check */
    enum smtp_bare_mode bare;
    int state;
    uint64_t size;
    size_t line_len;
    int too_big, bare_lf, bare_cr, long_line, done, failed;
};

#define SMTP_DEFAULT_MAX_LINE 998

void smtp_data_decoder_init(struct smtp_data_decoder *d, uint64_t max_size, size_t max_line,
                            enum smtp_bare_mode bare);
/* Start a new message with the same settings. */
void smtp_data_decoder_reset(struct smtp_data_decoder *d);
/* Decode up to len bytes; returns how many were consumed: all of them
 * unless the end was found (*done = 1; the rest belongs to the next
 * command) or out failed (d->failed). After the end, consumes nothing. */
size_t smtp_data_feed(struct smtp_data_decoder *d, const char *in, size_t len, smtp_out_fn out,
                      void *ctx, int *done);
/* Bare CR/LF seen in reject mode: the message must be refused. */
int smtp_data_rejected(const struct smtp_data_decoder *d);

/* ------------------------------------------------------------------ */
/* DATA encoder (client side): any input -> CRLF lines, dot-stuffed.
 * Bare CR and bare LF become CRLF. finish() ends the last line if needed
 * and writes the terminator ".\r\n"; the encoder is then ready for a new
 * message. Both return 0, or -1 when out failed. */
struct smtp_data_encoder {
    int bol; /* at the start of an output line */
    int cr;  /* an input CR is pending */
    uint64_t size; /* output bytes so far */
};

void smtp_data_encoder_init(struct smtp_data_encoder *e);
int smtp_data_encode(struct smtp_data_encoder *e, const char *in, size_t len, smtp_out_fn out,
                     void *ctx);
int smtp_data_encode_finish(struct smtp_data_encoder *e, smtp_out_fn out, void *ctx);

/* ------------------------------------------------------------------ */
/* Replies (client side) */

struct smtp_reply_line {
    int code;          /* 200 .. 559 */
    int last;          /* "ddd " or "ddd": the last line of the reply */
    const char *enhanced; /* "x.y.z" span, NULL when absent */
    size_t enhanced_len;
    const char *text;  /* after the separator and the enhanced code */
    size_t text_len;
};

/* Parse one reply line without its CRLF. Returns 0, or -1 with *reason
 * (static string) set. The enhanced code is recognised only when its class
 * equals the first digit of the reply code and a space or the end of the
 * line follows it. */
int smtp_parse_reply_line(const char *line, size_t len, struct smtp_reply_line *out,
                          const char **reason);

enum { SMTP_REPLY_ERROR = -1, SMTP_REPLY_MORE = 0, SMTP_REPLY_DONE = 1 };

struct smtp_reply_parser {
    size_t max_lines; /* default 100 */
    size_t max_line;  /* without CRLF, default 2048 */
    int code;
    size_t nlines;
    int complete;      /* the last line was seen: next feed starts anew */
    char enhanced[12]; /* the first one on any line, "" when none */
};

void smtp_reply_parser_init(struct smtp_reply_parser *p, size_t max_lines, size_t max_line);
/* Feed one line: SMTP_REPLY_MORE (a continuation line), SMTP_REPLY_DONE
 * (the last line: code and enhanced are those of the reply), or
 * SMTP_REPLY_ERROR (*reason set). line is filled in for MORE and DONE.
 * After DONE or ERROR the next line starts a new reply. */
int smtp_reply_feed(struct smtp_reply_parser *p, const char *line, size_t len,
                    struct smtp_reply_line *out, const char **reason);

/* Format a reply: text is split on CRLF, CR and LF into lines (one final
 * line break is dropped), other control characters (except TAB) are
 * removed, lines are wrapped to SMTP_MAX_REPLY_LINE octets, and every
 * line carries code and (when not NULL or "") the enhanced code.
 * Writes at most cap bytes to out and returns the full length, or
 * (size_t)-1 when code is not a reply code (2xx-5xx) or enhanced is
 * malformed or of another class. */
size_t smtp_format_reply(char *out, size_t cap, int code, const char *enhanced,
                         const char *text, size_t text_len);

/* ------------------------------------------------------------------ */
/* PROXY protocol (HAProxy) */

enum { SMTP_PROXY_INVALID = -1, SMTP_PROXY_MORE = 0, SMTP_PROXY_OK = 1 };
enum smtp_proxy_family { SMTP_PROXY_UNSPEC = 0, SMTP_PROXY_INET, SMTP_PROXY_INET6,
                         SMTP_PROXY_UNIX };

struct smtp_proxy {
    int version;  /* 1 or 2 */
    int local;    /* LOCAL (v2), UNKNOWN (v1) or UNSPEC family: no
                     addresses, use the connection's own */
    enum smtp_proxy_family family;
    int dgram;    /* v2 transport is DGRAM */
    char src[46], dst[46]; /* canonical text, "" when local */
    unsigned src_port, dst_port;
    size_t tlvs;  /* v2 TLVs seen (skipped) */
    size_t consumed; /* bytes of the header */
};

/* Parse a PROXY header at the start of buf. SMTP_PROXY_MORE: every byte
 * so far fits a header but it is incomplete; SMTP_PROXY_INVALID: not a
 * valid header (*reason set). */
int smtp_parse_proxy(const char *buf, size_t len, struct smtp_proxy *out, const char **reason);

/* ------------------------------------------------------------------ */
/* xtext (RFC 3461 4) */

/* Encode: returns the full encoded length, writes at most cap bytes. */
size_t smtp_xtext_encode(const char *in, size_t len, char *out, size_t cap);
/* Decode: 0 and *outlen, or -1 when in is not xtext or out (cap) too
 * small. Hex digits in either case are accepted. */
int smtp_xtext_decode(const char *in, size_t len, char *out, size_t cap, size_t *outlen);

/* ------------------------------------------------------------------ */
/* EHLO reply lines (client side) */

struct smtp_span {
    const char *p;
    size_t len;
};

struct smtp_ehlo_line {
    struct smtp_span keyword;
    struct smtp_span params[SMTP_EHLO_MAX_PARAMS];
    size_t nparams;
};

/* Parse the text of one EHLO reply line after the first ("SIZE 1000",
 * "AUTH PLAIN LOGIN"): 0, or -1 when the keyword is malformed, a byte
 * is not printable ASCII or there are too many parameters. Runs of
 * spaces separate parameters. */
int smtp_parse_ehlo_line(const char *text, size_t len, struct smtp_ehlo_line *out);

#endif
