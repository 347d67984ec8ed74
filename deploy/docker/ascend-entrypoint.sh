#!/bin/bash
# Entry point of the Ascend image: load the CANN environment, then run the command (the server).
# The driver itself (/usr/local/Ascend/driver) is mounted from the node by Ascend Docker Runtime.
for env_script in /usr/local/Ascend/ascend-toolkit/set_env.sh /usr/local/Ascend/cann/set_env.sh; do
    if [ -f "$env_script" ]; then
        # shellcheck source=/dev/null
        source "$env_script"
    fi
done
export LD_LIBRARY_PATH="/usr/local/Ascend/driver/lib64/common:/usr/local/Ascend/driver/lib64/driver${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
exec "$@"
