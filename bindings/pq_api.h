/* bindings/pq_api.h: libpq, opened on first use (core/dynlib.h) instead of linked: a process that
 * never talks to PostgreSQL then maps neither libpq nor what it pulls in (GnuTLS, Kerberos, LDAP:
 * about 3 MB of resident pages). bindings/pg.c calls ml_pq_load() in core.pg_connect, the call
 * every other one follows (they take a connection). A static executable opens it the same way:
 * no strong ml_pq_linked, since libpq ships no static archive worth linking. ML_PQ_DIRECT before
 * the include keeps the real names.
 */
#ifndef MLUA_PQ_API_H
#define MLUA_PQ_API_H

#include "../core/dynlib.h"

#include <libpq-fe.h>

#ifndef ML_PQ_SONAME
#define ML_PQ_SONAME "libpq.so.5"
#endif

#define ML_PQ_FUNCS(X)                                                                             \
  X(PQbackendPID)                                                                                  \
  X(PQcancel)                                                                                      \
  X(PQclear)                                                                                       \
  X(PQcmdStatus)                                                                                   \
  X(PQcmdTuples)                                                                                   \
  X(PQconnectPoll)                                                                                 \
  X(PQconnectStart)                                                                                \
  X(PQconsumeInput)                                                                                \
  X(PQerrorMessage)                                                                                \
  X(PQescapeIdentifier)                                                                            \
  X(PQfinish)                                                                                      \
  X(PQflush)                                                                                       \
  X(PQfname)                                                                                       \
  X(PQfreeCancel)                                                                                  \
  X(PQfreemem)                                                                                     \
  X(PQftype)                                                                                       \
  X(PQgetCancel)                                                                                   \
  X(PQgetResult)                                                                                   \
  X(PQgetisnull)                                                                                   \
  X(PQgetlength)                                                                                   \
  X(PQgetvalue)                                                                                    \
  X(PQisBusy)                                                                                      \
  X(PQnfields)                                                                                     \
  X(PQnotifies)                                                                                    \
  X(PQnparams)                                                                                     \
  X(PQntuples)                                                                                     \
  X(PQparamtype)                                                                                   \
  X(PQresultErrorField)                                                                            \
  X(PQresultErrorMessage)                                                                          \
  X(PQresultStatus)                                                                                \
  X(PQsendDescribePrepared)                                                                        \
  X(PQsendPrepare)                                                                                 \
  X(PQsendQuery)                                                                                   \
  X(PQsendQueryParams)                                                                             \
  X(PQsendQueryPrepared)                                                                           \
  X(PQsetNoticeProcessor)                                                                          \
  X(PQsetnonblocking)                                                                              \
  X(PQsocket)                                                                                      \
  X(PQstatus)                                                                                      \
  X(PQtransactionStatus)

typedef struct ml_pq_s {
  ML_PQ_FUNCS(ML_DYNLIB_SLOT)
} ml_pq_t;

extern ml_pq_t ml_pq; /* valid once ml_pq_load() returned NULL */
/* NULL once libpq is usable, else why not ("libpq is not installed (libpq.so.5)"). */
const char *ml_pq_load(void);
int ml_pq_linked(ml_pq_t *t); /* weak, returns 0: every build opens libpq on first use */

#ifndef ML_PQ_DIRECT
#define PQbackendPID ml_pq.PQbackendPID
#define PQcancel ml_pq.PQcancel
#define PQclear ml_pq.PQclear
#define PQcmdStatus ml_pq.PQcmdStatus
#define PQcmdTuples ml_pq.PQcmdTuples
#define PQconnectPoll ml_pq.PQconnectPoll
#define PQconnectStart ml_pq.PQconnectStart
#define PQconsumeInput ml_pq.PQconsumeInput
#define PQerrorMessage ml_pq.PQerrorMessage
#define PQescapeIdentifier ml_pq.PQescapeIdentifier
#define PQfinish ml_pq.PQfinish
#define PQflush ml_pq.PQflush
#define PQfname ml_pq.PQfname
#define PQfreeCancel ml_pq.PQfreeCancel
#define PQfreemem ml_pq.PQfreemem
#define PQftype ml_pq.PQftype
#define PQgetCancel ml_pq.PQgetCancel
#define PQgetResult ml_pq.PQgetResult
#define PQgetisnull ml_pq.PQgetisnull
#define PQgetlength ml_pq.PQgetlength
#define PQgetvalue ml_pq.PQgetvalue
#define PQisBusy ml_pq.PQisBusy
#define PQnfields ml_pq.PQnfields
#define PQnotifies ml_pq.PQnotifies
#define PQnparams ml_pq.PQnparams
#define PQntuples ml_pq.PQntuples
#define PQparamtype ml_pq.PQparamtype
#define PQresultErrorField ml_pq.PQresultErrorField
#define PQresultErrorMessage ml_pq.PQresultErrorMessage
#define PQresultStatus ml_pq.PQresultStatus
#define PQsendDescribePrepared ml_pq.PQsendDescribePrepared
#define PQsendPrepare ml_pq.PQsendPrepare
#define PQsendQuery ml_pq.PQsendQuery
#define PQsendQueryParams ml_pq.PQsendQueryParams
#define PQsendQueryPrepared ml_pq.PQsendQueryPrepared
#define PQsetNoticeProcessor ml_pq.PQsetNoticeProcessor
#define PQsetnonblocking ml_pq.PQsetnonblocking
#define PQsocket ml_pq.PQsocket
#define PQstatus ml_pq.PQstatus
#define PQtransactionStatus ml_pq.PQtransactionStatus
#endif

#endif
