// A Haraka plugin that makes Haraka a sink for the server benchmarks
// (bench/table.py): no reverse DNS lookup, every recipient accepted,
// every message discarded in the queue hook.
'use strict'
exports.hook_lookup_rdns = function (next) { next(OK, 'localhost') }
exports.hook_rcpt = function (next) { next(OK) }
exports.hook_queue = function (next) { next(OK) }
