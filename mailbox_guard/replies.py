"""Every SMTP reply the engine sends, named once (as aiosmtpd names ``S250_OK``).

The engine and the tests use these names; a reply text changes here or nowhere.
Internal errors never show exception text to the client.
"""

S220_BANNER = "220 {hostname} ESMTP mailbox_guard"
S221_BYE = "221 2.0.0 Bye"
S250_OK = "250 2.0.0 OK"
S250_SENDER_OK = "250 2.1.0 Sender OK"
S250_RECIPIENT_OK = "250 2.1.5 Recipient OK"
S250_QUEUED = "250 2.0.0 OK: queued as {queue_id}"
S252_CANNOT_VRFY = "252 2.5.2 Cannot VRFY user, but will accept message and attempt delivery"

S421_SHUTTING_DOWN = "421 4.3.2 {hostname} Service shutting down, try again later"
S421_TOO_MANY_ERRORS = "421 4.7.0 {hostname} Error: too many errors"
S421_TOO_MANY_CONNECTIONS = "421 4.7.0 {hostname} Error: too many connections, try again later"
S421_TOO_MANY_FROM_IP = "421 4.7.0 {hostname} Error: too many connections from your address"
S554_TOO_MANY_HOPS = "554 5.4.6 Error: too many hops (mail loop?)"
S421_TIMEOUT = "421 4.4.2 {hostname} Error: timeout exceeded"
S451_INTERNAL = "451 4.3.0 Error: internal error, please try again later"
S451_STORAGE = "451 4.3.0 Error: queue file write error, please try again later"
S451_CHECK_UNAVAILABLE = "451 4.3.0 Error: a policy check is temporarily unavailable, please try again later"
S452_TOO_MANY_RECIPIENTS = "452 4.5.3 Error: too many recipients"

S500_LINE_TOO_LONG = "500 5.5.2 Error: line too long"
S500_BARE_LF = "500 5.5.2 Error: bare <LF> received; lines must end with <CR><LF>"
S500_BARE_CR = "500 5.5.2 Error: bare <CR> received; lines must end with <CR><LF>"
S501_BAD_ADDRESS = "501 5.1.3 Error: bad address syntax"
S550_REJECTED = "550 5.7.1 Error: rejected by policy"
S550_USER_UNKNOWN = "550 5.1.1 <{address}>: Recipient address rejected: User unknown"
S552_TOO_BIG = "552 5.3.4 Error: message size exceeds fixed maximum message size"
S553_RELAY_TRICK = "553 5.7.1 <{address}>: Recipient address rejected: address form not accepted here"
S553_SENDER_NOT_OWNED = "553 5.7.1 Sender address rejected: not owned by user {user}"
S553_HEADER_NOT_OWNED = "553 5.7.1 From:/Sender: header rejected: not owned by user {user}"
S235_AUTH_OK = "235 2.7.0 Authentication successful"
S535_AUTH_FAILED = "535 5.7.8 Authentication credentials invalid"
S421_AUTH_FAILURES = "421 4.7.0 {hostname} Error: too many failed authentications"
S554_RELAY_DENIED = "554 5.7.1 <{address}>: Relay access denied"
