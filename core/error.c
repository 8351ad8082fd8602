/*
 * error.c -- names and messages of the core's error codes, from the one
 * AM2Z_ERRNO_MAP list so the three tables can never disagree.
 */
#include "am2z.h"

#include <string.h>

const char *am2z_strerror(int code)
{
    switch (code) {
    case AM2Z_OK: return "ok";
#define XX(name, msg) case AM2Z_##name: return msg;
    AM2Z_ERRNO_MAP(XX)
#undef XX
    default: return "unknown error";
    }
}

const char *am2z_err_name(int code)
{
    switch (code) {
    case AM2Z_OK: return "OK";
#define XX(name, msg) case AM2Z_##name: return #name;
    AM2Z_ERRNO_MAP(XX)
#undef XX
    default: return "EUNKNOWN";
    }
}

int am2z_err_from_name(const char *name)
{
    if (name == NULL)
        return AM2Z_EINVAL;
    if (strcmp(name, "OK") == 0)
        return AM2Z_OK;
#define XX(n, msg) if (strcmp(name, #n) == 0) return AM2Z_##n;
    AM2Z_ERRNO_MAP(XX)
#undef XX
    return AM2Z_EINVAL;
}
