/*
 * SHA-256 for the state store's integrity hash (ARCHITECTURE.md, "State
 * store"): OpenSSL's EVP one-shot digest, as lowercase hex.
 */
#include <openssl/evp.h>

#include "am2z.h"

int am2z_sha256_hex(const void *data, size_t len, char out[65])
{
    static const char hex[] = "0123456789abcdef";
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    if (out == NULL || (data == NULL && len > 0)) return AM2Z_EINVAL;
    if (EVP_Digest(data, len, md, &n, EVP_sha256(), NULL) != 1 || n != 32) return AM2Z_EFAILED;
    for (unsigned int i = 0; i < n; i++) {
        out[2 * i] = hex[md[i] >> 4];
        out[2 * i + 1] = hex[md[i] & 15];
    }
    out[64] = '\0';
    return 0;
}
