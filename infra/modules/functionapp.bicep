// The function app `func-sync-<env>`: a Linux Elastic Premium plan running the custom handler
// (FUNCTIONS_WORKER_RUNTIME=custom; the package is host.json, the `handler` binary and one
// folder per function). Custom handlers are not supported on Flex Consumption; Elastic Premium
// keeps an instance warm, so the every-minute scheduler and the webhook receiver answer
// without a cold start, and scales on the Service Bus queues.
//
// Every app setting the handler reads in Azure is set here, identity-based: each service gets
// its endpoint and the user-assigned identity's client id, never a key.

param env string
param location string
param tags object
param planSku string
param maximumInstances int
param identityId string
param identityClientId string
param storageAccountName string
param contentShareName string
@description('Key Vault secret holding the content share\'s connection string.')
param contentShareSecretUri string
param appInsightsConnectionString string
param serviceBusHost string
param cosmosEndpoint string
param cosmosDatabase string
param cosmosContainer string
param keyVaultUri string
param eventGridEndpoint string
param historyRetentionDays int
param historyRetentionDaysByTenant string
param tokenRefreshThresholdMs int
param syncMaxRecords int
param syncMinIntervalMinutes int
param syncMaxConcurrentPerTenant int

resource plan 'Microsoft.Web/serverfarms@2023-12-01' = {
  name: 'plan-sync-${env}'
  location: location
  tags: tags
  kind: 'elastic'
  sku: {
    name: planSku
    tier: 'ElasticPremium'
  }
  properties: {
    // Linux.
    reserved: true
    maximumElasticWorkerCount: maximumInstances
  }
}

var name = 'func-sync-${env}'

resource site 'Microsoft.Web/sites@2023-12-01' = {
  name: name
  location: location
  tags: tags
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    // Key Vault references are resolved with the app's identity.
    keyVaultReferenceIdentity: identityId
    siteConfig: {
      minTlsVersion: '1.2'
      ftpsState: 'Disabled'
      functionAppScaleLimit: maximumInstances
      appSettings: [
        // The Functions host.
        {
          name: 'FUNCTIONS_EXTENSION_VERSION'
          value: '~4'
        }
        {
          name: 'FUNCTIONS_WORKER_RUNTIME'
          value: 'custom'
        }
        {
          name: 'AzureWebJobsStorage__accountName'
          value: storageAccountName
        }
        {
          name: 'AzureWebJobsStorage__credential'
          value: 'managedidentity'
        }
        {
          name: 'AzureWebJobsStorage__clientId'
          value: identityClientId
        }
        // Elastic Premium mounts the app's files from Azure Files, which takes a key: kept in
        // Key Vault, referenced here.
        {
          name: 'WEBSITE_CONTENTAZUREFILECONNECTIONSTRING'
          value: '@Microsoft.KeyVault(SecretUri=${contentShareSecretUri})'
        }
        {
          name: 'WEBSITE_CONTENTSHARE'
          value: contentShareName
        }
        {
          // The reference cannot be resolved while the platform validates the setting; the
          // share exists already (storage module).
          name: 'WEBSITE_SKIP_CONTENTSHARE_VALIDATION'
          value: '1'
        }
        // Service Bus, for the host's triggers and the handler's sends alike.
        {
          name: 'ServiceBusConnection__fullyQualifiedNamespace'
          value: serviceBusHost
        }
        {
          name: 'ServiceBusConnection__credential'
          value: 'managedidentity'
        }
        {
          name: 'ServiceBusConnection__clientId'
          value: identityClientId
        }
        // The handler's backends.
        {
          name: 'AZURE_CLIENT_ID'
          value: identityClientId
        }
        {
          name: 'COSMOS_ENDPOINT'
          value: cosmosEndpoint
        }
        {
          name: 'COSMOS_DATABASE'
          value: cosmosDatabase
        }
        {
          name: 'COSMOS_CONTAINER'
          value: cosmosContainer
        }
        {
          name: 'COSMOS_REGION'
          value: location
        }
        {
          name: 'KEY_VAULT_URL'
          value: keyVaultUri
        }
        {
          name: 'EVENTGRID_ENDPOINT'
          value: eventGridEndpoint
        }
        {
          name: 'EVENTGRID_SCHEMA'
          value: 'cloudevents'
        }
        {
          name: 'APPLICATIONINSIGHTS_CONNECTION_STRING'
          value: appInsightsConnectionString
        }
        {
          name: 'APPLICATIONINSIGHTS_AUTHENTICATION_STRING'
          value: 'Authorization=AAD;ClientId=${identityClientId}'
        }
        // What the sync does.
        {
          name: 'WEBHOOK_BASE_URL'
          value: 'https://${name}.azurewebsites.net'
        }
        // WebhookReceiver's authLevel is `function`: providers bring the host key `webhooks`
        // in `?code=`. scripts/deploy.sh keeps its value in this secret and sets the key; the
        // handler puts it in the URLs it registers (Graph subscriptions, Drive channels).
        {
          name: 'WEBHOOK_FUNCTION_KEY'
          value: '@Microsoft.KeyVault(SecretUri=${keyVaultUri}secrets/webhook-function-key)'
        }
        {
          name: 'TOKEN_REFRESH_ENABLED'
          value: 'true'
        }
        {
          name: 'TOKEN_REFRESH_EXPIRATION_THRESHOLD_MS'
          value: string(tokenRefreshThresholdMs)
        }
        {
          name: 'SYNC_MAX_RECORDS'
          value: string(syncMaxRecords)
        }
        {
          name: 'SYNC_MIN_INTERVAL_MINUTES'
          value: string(syncMinIntervalMinutes)
        }
        {
          name: 'SYNC_MAX_CONCURRENT_PER_TENANT'
          value: string(syncMaxConcurrentPerTenant)
        }
        {
          name: 'HISTORY_RETENTION_DAYS'
          value: string(historyRetentionDays)
        }
        {
          name: 'HISTORY_RETENTION_DAYS_BY_TENANT'
          value: historyRetentionDaysByTenant
        }
        {
          name: 'FUNC_SYNC_LOG_FORMAT'
          value: 'json'
        }
        {
          name: 'RUST_LOG'
          value: 'info'
        }
      ]
    }
  }
}

output name string = site.name
output hostName string = site.properties.defaultHostName
