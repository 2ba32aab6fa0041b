// The PKCS#11 types, from p11-kit's pkcs11.h (compat names: CK_RV, pIv...).
#pragma once
#include <p11-kit/pkcs11.h>
