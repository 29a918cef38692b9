#!/usr/bin/env bash
# Deploys func-sync to one environment: the resources (infra/main.bicep, after a what-if and a
# confirmation), then the packaged app (scripts/package.sh) to func-sync-<env>.
#
# Usage: scripts/deploy.sh <dev|staging|prod> [--yes] [--func]
#   --yes   deploy the infrastructure without asking after the what-if
#   --func  publish with Azure Functions Core Tools instead of zip deployment
# Environment: LOCATION (default westeurope) for a resource group that does not exist yet;
# DEPLOYER_OBJECT_ID (and DEPLOYER_PRINCIPAL_TYPE) where the login cannot look itself up.
set -euo pipefail

usage() {
  echo "usage: $0 <dev|staging|prod> [--yes] [--func]" >&2
  exit 2
}

[ $# -ge 1 ] || usage
env=$1
shift
case "$env" in dev | staging | prod) ;; *) usage ;; esac
yes=false
func=false
for arg in "$@"; do
  case "$arg" in
    --yes) yes=true ;;
    --func) func=true ;;
    *) usage ;;
  esac
done

root=$(cd "$(dirname "$0")/.." && pwd)
group="rg-sync-$env"
app="func-sync-$env"
location=${LOCATION:-westeurope}

command -v az >/dev/null || { echo "the Azure CLI (az) is needed: https://aka.ms/azcli" >&2; exit 1; }
if $func; then
  command -v func >/dev/null || { echo "--func needs Azure Functions Core Tools (func)" >&2; exit 1; }
fi
az account show --query '{subscription:name, id:id}' -o table >/dev/null \
  || { echo "not logged in: az login, then az account set -s <subscription>" >&2; exit 1; }

if [ "$(az group exists -n "$group")" != "true" ]; then
  echo "creating resource group $group in $location"
  az group create -n "$group" -l "$location" -o none
fi

echo "what the deployment would change in $group:"
az deployment group what-if -g "$group" -f "$root/infra/main.bicep" \
  -p "$root/infra/parameters/$env.bicepparam"
if ! $yes; then
  read -r -p "deploy these changes to $env? [y/N] " answer
  [ "$answer" = "y" ] || [ "$answer" = "Y" ] || { echo "nothing deployed"; exit 1; }
fi
az deployment group create -g "$group" -n "func-sync-$(date +%Y%m%d%H%M%S)" \
  -f "$root/infra/main.bicep" -p "$root/infra/parameters/$env.bicepparam" -o none

# WebhookReceiver asks providers for a function key: one kept in Key Vault, made at the first
# deployment and the same ever after (the URLs registered with providers carry it). The app
# setting WEBHOOK_FUNCTION_KEY references the secret; the host key is set below.
# The key goes through files only readable here, never on a command line others can list.
vault=$(az keyvault list -g "$group" --query '[0].name' -o tsv)
secrets=$(mktemp -d)
chmod 700 "$secrets"
trap 'rm -rf "$secrets"' EXIT
read_key() {
  az keyvault secret show --vault-name "$vault" -n webhook-function-key \
    --query value -o tsv > "$secrets/key" 2> "$secrets/error"
}
# The vault takes RBAC only, and Owner grants no data-plane role: the deploying identity is
# made Key Vault Secrets Officer on it the first time, and the key read again once the role
# has reached the vault (minutes, at worst).
# A login that cannot look itself up in Microsoft Graph (a pipeline's service principal, a
# managed identity) names itself: DEPLOYER_OBJECT_ID, and DEPLOYER_PRINCIPAL_TYPE if it is not
# a service principal.
if ! read_key && grep -q Forbidden "$secrets/error"; then
  deployer=${DEPLOYER_OBJECT_ID:-}
  deployer_type=${DEPLOYER_PRINCIPAL_TYPE:-ServicePrincipal}
  if [ -z "$deployer" ]; then
    if [ "$(az account show --query user.type -o tsv)" = "servicePrincipal" ]; then
      deployer=$(az ad sp show --id "$(az account show --query user.name -o tsv)" \
        --query id -o tsv 2>/dev/null || true)
    else
      deployer=$(az ad signed-in-user show --query id -o tsv 2>/dev/null || true)
      deployer_type=User
    fi
  fi
  if [ -z "$deployer" ]; then
    echo "cannot read the webhook function key from $vault, nor find the deploying identity's" \
      "object id to grant it Key Vault Secrets Officer there: set DEPLOYER_OBJECT_ID (and" \
      "DEPLOYER_PRINCIPAL_TYPE=User for a user), or grant the role; nothing deployed further" >&2
    exit 1
  fi
  echo "granting the deploying identity Key Vault Secrets Officer on $vault"
  az role assignment create --assignee-object-id "$deployer" \
    --assignee-principal-type "$deployer_type" --role "Key Vault Secrets Officer" \
    --scope "$(az keyvault show -n "$vault" --query id -o tsv)" -o none
  for _ in $(seq 1 60); do
    if read_key || ! grep -q Forbidden "$secrets/error"; then break; fi
    sleep 10
  done
fi
if [ ! -s "$secrets/key" ]; then
  # Made only where there is none: a new key would break every URL registered with one.
  if ! grep -q SecretNotFound "$secrets/error"; then
    cat "$secrets/error" >&2
    echo "cannot read the webhook function key from $vault; nothing deployed further" >&2
    exit 1
  fi
  echo "making the webhook function key (Key Vault secret webhook-function-key)"
  head -c 32 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n' > "$secrets/key"
  az keyvault secret set --vault-name "$vault" -n webhook-function-key \
    --file "$secrets/key" -o none
fi
# As az printed it, with a line break (printf is the shell's own: no process shows the key).
key=$(cat "$secrets/key")
printf %s "$key" > "$secrets/key"

"$root/scripts/package.sh"
if $func; then
  (cd "$root/dist/func-sync" && func azure functionapp publish "$app" --custom)
else
  az functionapp deployment source config-zip -g "$group" -n "$app" --src "$root/dist/func-sync.zip" -o none
fi

az functionapp keys set -g "$group" -n "$app" --key-type functionKeys --key-name webhooks \
  --key-value "@$secrets/key" -o none
# The app may have resolved its Key Vault reference before the secret existed (this run made
# it, or one that stopped after making it): a restart resolves it again.
az functionapp restart -g "$group" -n "$app" -o none

host=$(az functionapp show -g "$group" -n "$app" --query defaultHostName -o tsv)
echo "deployed: https://$host"
echo "provider webhooks: https://$host/api/webhooks/<provider>?code=<the Key Vault secret webhook-function-key in $vault>"
